"""Cut OpenAI's OpenAPI document down to the schemas the proxy's answers are checked against.

    python3 tests/data/openai-openapi/cut.py PATH/TO/openapi.yaml

reads the whole document (openai/openai-openapi, `openapi.yaml`) and writes `schemas.json` beside
this file: the schemas below and every schema they refer to, with the document's version. The
whole document is about 3 MB; this cut is what tests/test_openai_conformance.py needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = ("ListModelsResponse", "Model", "ErrorResponse", "CreateChatCompletionResponse",
         "CreateChatCompletionStreamResponse", "CreateCompletionResponse", "CreateEmbeddingResponse")


def references(value: Any) -> set[str]:
    if isinstance(value, dict):
        found = {value["$ref"].rsplit("/", 1)[-1]} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(references(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(references(v) for v in value))
    return set()


def cut(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    wanted: dict[str, Any] = {}
    pending = list(ROOTS)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted[name] = schemas[name]
            pending += sorted(references(schemas[name]) - set(wanted))
    return {"source": "https://github.com/openai/openai-openapi", "version": document["info"]["version"],
            "license": document["info"]["license"]["name"], "roots": list(ROOTS),
            "schemas": dict(sorted(wanted.items()))}


if __name__ == "__main__":
    whole = yaml.safe_load(Path(sys.argv[1]).read_text(encoding="utf-8"))
    (Path(__file__).parent / "schemas.json").write_text(json.dumps(cut(whole), indent=1, sort_keys=False) + "\n")
