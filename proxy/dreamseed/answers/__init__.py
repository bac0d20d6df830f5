"""Answer accuracy with and without retrieval, end to end through a running proxy
(`dreamseed eval answers`): the question set (`dataset`), the scores (`scoring`), asking the proxy
with a resumable answer cache (`asking`), and an optional LLM judge (`judge`)."""
