"""Documents generated from the schema: a JSON Schema per policy file (editors with a YAML
language server validate and complete the shipped files with it) and the policy reference
tables in docs/. ``dreamseed docs --write`` regenerates both; a test fails when the
committed copies are stale, so the schema stays the one source of truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from .schema import BACKENDS_FILE, RAG_FILE, ROUTING_FILE, SCALE_FILE, Catalog, Rag, Routing, Scale

FILES: dict[str, type] = {BACKENDS_FILE: Catalog, ROUTING_FILE: Routing, RAG_FILE: Rag, SCALE_FILE: Scale}
SCHEMA_DIR = Path("docs") / "schema"
REFERENCE = Path("docs") / "policy-reference.md"


def schema_name(policy_file: str) -> str:
    return policy_file.removesuffix(".yaml") + ".schema.json"


def json_schema(policy_file: str) -> dict[str, Any]:
    schema: dict[str, Any] = msgspec.json.schema(FILES[policy_file])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"DreamSeed {policy_file}", **schema}


def json_schema_text(policy_file: str) -> str:
    return json.dumps(json_schema(policy_file), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def _type(spec: dict[str, Any]) -> str:
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in spec:
        return " or ".join(_type(s) for s in spec["anyOf"])
    if "enum" in spec:
        return " \\| ".join(f"`{v}`" for v in spec["enum"])
    kind = spec.get("type")
    if kind == "array":
        return f"list of {_type(spec.get('items', {}))}"
    if kind == "object" and "additionalProperties" in spec:
        return f"map of name → {_type(spec['additionalProperties'])}"
    return {"null": "null", "string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
            "object": "mapping"}.get(str(kind), "any")


def _constraints(spec: dict[str, Any]) -> str:
    parts = []
    for key, text in (("exclusiveMinimum", "> {}"), ("minimum", "≥ {}"), ("exclusiveMaximum", "< {}"),
                      ("maximum", "≤ {}"), ("minLength", "length ≥ {}"), ("maxLength", "length ≤ {}"),
                      ("minItems", "≥ {} items"), ("maxItems", "≤ {} items"), ("pattern", "matches `{}`")):
        if key in spec:
            parts.append(text.format(spec[key]))
    for option in spec.get("anyOf", []):
        inner = _constraints(option)
        if inner:
            parts.append(inner)
    return ", ".join(parts)


def _default(spec: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in spec:
        return ""
    text = json.dumps(spec["default"], ensure_ascii=False)
    return f"`{text}`" if len(text) <= 40 else "(see the nested table)"


def markdown_reference() -> str:
    out = ["# Policy reference", "",
           "Generated from the msgspec Structs in `proxy/dreamseed/policy/schema.py` by "
           "`dreamseed docs --write`; do not edit by hand (a test fails when it is stale). "
           "The same schema is in `docs/schema/*.schema.json` for editors. Unknown fields are errors everywhere.", ""]
    seen: set[str] = set()
    for policy_file, struct in FILES.items():
        schema = msgspec.json.schema(struct)
        out += [f"## `{policy_file}`", "", f"Top level: [{struct.__name__}](#{struct.__name__.lower()}).", ""]
        for name, definition in schema["$defs"].items():
            if name in seen:
                continue
            seen.add(name)
            out += [f"### {name}", ""]
            if definition.get("description"):
                out += [" ".join(definition["description"].split()), ""]
            properties = definition.get("properties", {})
            required = set(definition.get("required", []))
            if not properties:
                out += ["(no fields)", ""]
                continue
            out += ["| field | type | default | constraints |", "|---|---|---|---|"]
            for field, spec in properties.items():
                out.append(f"| `{field}` | {_type(spec)} | {_default(spec, field in required)} | "
                           f"{_constraints(spec)} |".replace("|  |", "| |"))
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def generated(root: Path) -> dict[Path, str]:
    """Every generated file, by its path under ``root``, with its content."""
    files = {root / SCHEMA_DIR / schema_name(name): json_schema_text(name) for name in FILES}
    files[root / REFERENCE] = markdown_reference()
    return files
