"""Retrieval quality on a BEIR-layout set: corpus.jsonl, queries.jsonl, qrels/test.tsv.

Standard definitions at cut-off k, over documents (a document's rank is that of its best
chunk), with graded relevance from the qrels (grade > 0 is relevant):
  Recall@k  relevant documents in the top k / relevant documents
  MRR@k     1 / rank of the first relevant document in the top k (0 if none)
  nDCG@k    DCG / ideal DCG, DCG = sum of grade / log2(rank + 1) (linear gain, as trec_eval
            and BEIR compute it)
Those rank what retrieval finds with its thresholds off. What a request would really get in its
prompt (the rule's `top_k`, `min_similarity`, `min_term_match`) is measured too:
  context precision  passages injected from relevant documents / passages injected (over all
                     queries: one irrelevant passage costs the same wherever it goes)
  context recall     answerable queries that got at least one passage of a relevant document
  passages           passages injected per query, on average
  nothing relevant   queries whose judged documents are all grade 0 ("nothing in the corpus
                     answers this"): the share that got no passage at all, as they should
  P50/P95 ms         time per retrieval (embedding + SQL), as a request spends it
Queries are reported together and by language (a query with Hangul in it is Korean).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..policy import Rag, RetrievalMode
from .augment import EVAL_COLLECTION_PREFIX
from .language import language

if TYPE_CHECKING:
    from .retriever import Retriever


class EvalSetError(Exception):
    pass


@dataclass(frozen=True)
class EvalSet:
    name: str
    corpus: dict[str, tuple[str, str]]  # id -> (title, text)
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}


def _jsonl(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        raise EvalSetError(f"{path}: missing")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or "_id" not in row or "text" not in row:
            raise EvalSetError(f"{path}:{number}: each line needs \"_id\" and \"text\"")
        rows.append(row)
    return rows


def load_eval_set(directory: str | Path, split: str = "test") -> EvalSet:
    directory = Path(directory)
    corpus = {str(row["_id"]): (str(row.get("title") or ""), str(row["text"])) for row in _jsonl(directory / "corpus.jsonl")}
    queries = {str(row["_id"]): str(row["text"]) for row in _jsonl(directory / "queries.jsonl")}
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise EvalSetError(f"{qrels_path}: missing")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(qrels_path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if number == 1 and fields[0] == "query-id" or not line.strip():
            continue
        if len(fields) != 3 or not fields[2].strip().lstrip("-").isdigit():
            raise EvalSetError(f"{qrels_path}:{number}: expected query-id<TAB>corpus-id<TAB>score")
        query, doc, grade = fields[0], fields[1], int(fields[2])
        if query not in queries:
            raise EvalSetError(f"{qrels_path}:{number}: unknown query id {query!r}")
        if doc not in corpus:
            raise EvalSetError(f"{qrels_path}:{number}: unknown corpus id {doc!r}")
        qrels.setdefault(query, {})[doc] = grade
    return EvalSet(directory.name, corpus, {q: t for q, t in queries.items() if q in qrels}, qrels)


def recall_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    wanted = {doc for doc, grade in relevant.items() if grade > 0}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


def mrr_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    for rank, doc in enumerate(ranked[:k], start=1):
        if relevant.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    dcg = sum(max(relevant.get(doc, 0), 0) / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(grade / math.log2(rank + 1) for rank, grade in enumerate(ideal, start=1))
    return dcg / idcg if idcg else 0.0


def answerable(eval_set: EvalSet, query: str) -> bool:
    return any(grade > 0 for grade in eval_set.qrels[query].values())


@dataclass(frozen=True)
class Injected:
    """What one query would have put in a prompt: each passage's document, and the time taken."""

    documents: Sequence[str]
    seconds: float


def scores(runs: Mapping[str, Sequence[str]], injected: Mapping[str, Injected], eval_set: EvalSet,
           k: int = 10) -> dict[str, dict[str, float]]:
    """{"all"|"en"|"ko": {"recall", "mrr", "ndcg", "queries", "context_precision", "context_recall", "passages",
    "unanswerable", "unanswerable_empty", "p50_ms", "p95_ms"}}: ranking metrics over the answerable
    queries' ``runs``, the rest over ``injected``."""
    groups: dict[str, list[str]] = {"all": list(injected)}
    for query in injected:
        groups.setdefault(language(eval_set.queries[query]), []).append(query)
    result: dict[str, dict[str, float]] = {}
    for group, queries in groups.items():
        ranked = [q for q in queries if answerable(eval_set, q) and q in runs]
        n = len(ranked) or 1
        passages = [doc for q in queries for doc in injected[q].documents]
        relevant = sum(1 for q in queries for doc in injected[q].documents if eval_set.qrels[q].get(doc, 0) > 0)
        unanswerable = [q for q in queries if not answerable(eval_set, q)]
        milliseconds = np.array([injected[q].seconds * 1e3 for q in queries])
        result[group] = {
            "recall": sum(recall_at(runs[q], eval_set.qrels[q], k) for q in ranked) / n,
            "mrr": sum(mrr_at(runs[q], eval_set.qrels[q], k) for q in ranked) / n,
            "ndcg": sum(ndcg_at(runs[q], eval_set.qrels[q], k) for q in ranked) / n,
            "queries": len(ranked),
            "context_precision": relevant / len(passages) if passages else 1.0,
            "context_recall": sum(1 for q in ranked if any(eval_set.qrels[q].get(doc, 0) > 0
                                                           for doc in injected[q].documents)) / n,
            "passages": len(passages) / len(queries) if queries else 0.0,
            "unanswerable": len(unanswerable),
            "unanswerable_empty": (sum(1 for q in unanswerable if not injected[q].documents) / len(unanswerable)
                                   if unanswerable else 1.0),
            "p50_ms": float(np.percentile(milliseconds, 50)) if len(milliseconds) else 0.0,
            "p95_ms": float(np.percentile(milliseconds, 95)) if len(milliseconds) else 0.0,
        }
    return result


def documents_ranked(sources: Sequence[str]) -> list[str]:
    """Chunk hits -> document ranking: each document at the rank of its best chunk."""
    return list(dict.fromkeys(sources))


async def evaluate(retriever: Retriever, eval_dir: Path, modes: list[RetrievalMode], k: int, rag: Rag,
                   stage: Callable[[str], object] = lambda where: None) -> dict[str, dict[str, dict[str, float]]]:
    """Ingest a BEIR-layout set into its own collection, then run every query in each mode twice:
    thresholds off and 50 deep (the ranking), and as a request would (rag.yaml's top_k and
    thresholds: what goes into the prompt, and how long it takes). ``stage`` hears where it is."""
    from .ingest import ingest_texts

    eval_set = load_eval_set(eval_dir)
    collection = f"{EVAL_COLLECTION_PREFIX}{eval_set.name}"
    assert retriever.store is not None and retriever.embedder is not None
    documents = [(doc_id, f"{title}\n\n{text}" if title else text, {"eval_doc": doc_id})
                 for doc_id, (title, text) in eval_set.corpus.items()]
    stage(f"ingesting the {len(documents)} documents of {eval_dir}")
    await ingest_texts(retriever.store, retriever.embedder, collection, documents, rag.chunking)
    results: dict[str, dict[str, dict[str, float]]] = {}
    base = rag.settings("", "")
    for mode in modes:
        settings = dataclasses.replace(base, collection=collection, mode=mode)
        runs, injected = {}, {}
        for done, (query_id, text) in enumerate(eval_set.queries.items()):
            stage(f"mode {mode}: {done} of {len(eval_set.queries)} queries")
            if answerable(eval_set, query_id):
                hits = await retriever.search(settings, text, top_k=50, min_similarity=-1.0, min_term_match=0.0)
                runs[query_id] = documents_ranked([hit.source for hit in hits])[:k]
            started = time.perf_counter()
            hits = await retriever.search(settings, text)
            injected[query_id] = Injected([hit.source for hit in hits], time.perf_counter() - started)
        results[mode] = scores(runs, injected, eval_set, k)
    return results
