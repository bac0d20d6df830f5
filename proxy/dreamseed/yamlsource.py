"""Load YAML while remembering where every value came from.

Policy files are edited by hand and reviewed in pull requests, so an error must point at
a line. PyYAML's composer keeps a source mark on every node; this module keeps that node
tree next to the plain data so a field path like ``("backends", "general", "max_concurrency")``
can be turned back into a line number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PathKey = str | int


class YamlSyntaxError(Exception):
    def __init__(self, file: Path, line: int | None, message: str) -> None:
        super().__init__(message)
        self.file = file
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class YamlSource:
    file: Path
    data: Any
    root: yaml.Node | None

    def line_of(self, path: tuple[PathKey, ...]) -> int | None:
        """1-based line of the value at ``path``, or of its nearest existing parent."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for key in path:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == key:
                        line = key_node.start_mark.line + 1
                        node = value_node
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                return line
        return line


def load_yaml(file: Path) -> YamlSource:
    """Parse one YAML document, refusing duplicate keys (YAML would silently keep the last)."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise YamlSyntaxError(file, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _refuse_duplicate_keys(file, root)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise YamlSyntaxError(file, line, f"invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(file, None, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    return YamlSource(file=file, data=data, root=root)


def _refuse_duplicate_keys(file: Path, node: yaml.Node) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise YamlSyntaxError(
                        file, line, f"duplicate key {key!r} (first defined on line {seen[key]})"
                    )
                seen[key] = line
            _refuse_duplicate_keys(file, value_node)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(file, item)
