"""Retrieval-augmented generation: documents in Postgres/pgvector, embedded with fastembed
(or an OpenAI-compatible /v1/embeddings server), retrieved by vector, lexical or hybrid
search and put into routed prompts.

Where things live:
  database.py    which Postgres (DATABASE_URL, or an embedded one under the state directory)
  embedders.py   text -> vectors, off the event loop and batched
  models.py      building a local model folder from PyPI packages (air-gapped sites)
  store.py       the documents table, its indexes, and the retrieval SQL
  chunking.py    splitting documents into overlapping chunks
  ingest.py      files -> chunks -> vectors -> rows
  augment.py     putting retrieved context into a request
  retriever.py   what the proxy calls per request: time budget and degradation
  evaluation.py  Recall/MRR/nDCG@k on BEIR-layout sets
"""
