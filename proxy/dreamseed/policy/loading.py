"""Loading the policy files: YAML with line numbers, strict conversion to the schema, and
msgspec's error paths turned into file, line and field."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from ..yamlsource import PathKey, YamlSource, YamlSyntaxError, load_yaml
from .checks import check_catalog, check_rag, check_routing, check_scale, field_name
from .schema import (
    BACKENDS_FILE,
    RAG_FILE,
    ROUTING_FILE,
    SCALE_FILE,
    Catalog,
    Policies,
    PolicyError,
    PolicyProblem,
    Rag,
    Routing,
    Scale,
    T,
)


def load_policies(directory: str | Path) -> Policies:
    """Read, validate and cross-check every policy file in ``directory``."""
    directory = Path(directory)
    problems: list[PolicyProblem] = []
    catalog_src, catalog = _load_file(directory / BACKENDS_FILE, Catalog, problems)
    routing_src, routing = _load_file(directory / ROUTING_FILE, Routing, problems)
    if catalog is not None and catalog_src is not None:
        problems += check_catalog(catalog_src, catalog)
    if catalog is not None and routing is not None and routing_src is not None:
        problems += check_routing(routing_src, routing, catalog)
    rag = Rag()
    if (directory / RAG_FILE).exists():
        rag_src, loaded = _load_file(directory / RAG_FILE, Rag, problems)
        if loaded is not None and rag_src is not None:
            rag = loaded
            problems += check_rag(rag_src, rag, catalog, routing)
    scale = Scale()
    if (directory / SCALE_FILE).exists():
        scale_src, loaded_scale = _load_file(directory / SCALE_FILE, Scale, problems)
        if loaded_scale is not None and scale_src is not None:
            scale = loaded_scale
            problems += check_scale(scale_src, scale, catalog)
    if problems:
        raise PolicyError(problems)
    assert catalog is not None and routing is not None
    return Policies(directory=directory, catalog=catalog, routing=routing, rag=rag, scale=scale)


def load_catalog(directory: str | Path) -> Catalog:
    """Only the backend catalog, checked against its schema but not cross-checked: for showing a
    GPU memory plan that does not fit yet (``dreamseed policies plan``)."""
    problems: list[PolicyProblem] = []
    _, catalog = _load_file(Path(directory) / BACKENDS_FILE, Catalog, problems)
    if problems or catalog is None:
        raise PolicyError(problems)
    return catalog


def _load_file(
    file: Path, schema: type[T], problems: list[PolicyProblem]
) -> tuple[YamlSource | None, T | None]:
    if not file.is_file():
        problems.append(PolicyProblem(file, None, "", "file not found"))
        return None, None
    try:
        source = load_yaml(file)
    except YamlSyntaxError as exc:
        problems.append(PolicyProblem(exc.file, exc.line, "", exc.message))
        return None, None
    if not isinstance(source.data, dict):
        problems.append(PolicyProblem(file, source.line_of(()), "", "expected a mapping at the top level"))
        return source, None
    try:
        return source, msgspec.convert(source.data, schema, strict=True)
    except msgspec.ValidationError as exc:
        problems.append(_validation_problem(source, schema, str(exc)))
        return source, None


_AT_PATH = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.DOTALL)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_ANY_KEY = "..."  # msgspec's path names a dict value as [...], without its key


def _validation_problem(source: YamlSource, schema: type, text: str) -> PolicyProblem:
    """Turn msgspec's "Expected `int`, got `str` - at `$.a[...].b`" into file, line and field."""
    parsed = _AT_PATH.match(text)
    assert parsed is not None  # the pattern matches any string
    message, raw_path = parsed["message"], parsed["path"] or "$"
    path: list[PathKey] = [
        name if name else (_ANY_KEY if index == _ANY_KEY else int(index))
        for name, index in _PATH_PART.findall(raw_path[1:])
    ]
    if _ANY_KEY in path:
        path = _resolve_dict_keys(source.data, schema, path, text)
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        # Point at the misspelt key itself, not at the mapping that holds it.
        path.append(unknown[1])
        message = f"unknown field {unknown[1]!r}"
    return PolicyProblem(source.file, source.line_of(tuple(path)), field_name(path), message)


def _resolve_dict_keys(data: object, schema: type, path: list[PathKey], error: str) -> list[PathKey]:
    """Find which key each [...] stands for: narrow that mapping to one entry at a time and
    keep the entry that reproduces the same error."""
    resolved = list(path)
    for position, part in enumerate(path):
        if part != _ANY_KEY:
            continue
        mapping = _get(data, resolved[:position])
        if not isinstance(mapping, dict):
            break
        for key in mapping:
            narrowed = _replace(data, resolved[:position], {key: mapping[key]})
            try:
                msgspec.convert(narrowed, schema, strict=True)
            except msgspec.ValidationError as exc:
                if str(exc) == error:
                    resolved[position] = key
                    data = narrowed
                    break
    return [part for part in resolved if part != _ANY_KEY]  # drop any [...] left unresolved


def _get(data: object, path: list[PathKey]) -> object:
    for part in path:
        data = data[part]  # type: ignore[index]
    return data


def _replace(data: object, path: list[PathKey], value: object) -> object:
    """A copy of ``data`` with the value at ``path`` replaced (copying only along the path)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, dict):
        return {**data, head: _replace(data[head], rest, value)}
    assert isinstance(data, list) and isinstance(head, int)
    copy = list(data)
    copy[head] = _replace(data[head], rest, value)
    return copy


