"""The documentation generated from code: the policy JSON Schemas and reference (policy/reference.py)
and the error table of docs/api.md (errors.ERRORS). ``dreamseed docs --write`` regenerates them;
``dreamseed docs`` (and a test) fails when a committed copy is stale."""

from __future__ import annotations

from pathlib import Path

from .errors import error_table
from .policy import reference

API_DOC = Path("docs") / "api.md"
BEGIN, END = "<!-- errors:begin -->\n", "<!-- errors:end -->\n"


def with_error_table(text: str) -> str:
    """docs/api.md's text with the table between the markers replaced by the current one."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + error_table() + text[end:]


def generated(root: Path) -> dict[Path, str]:
    """Every generated file, by its path under ``root``, with the content it should have."""
    files = reference.generated(root)
    api = root / API_DOC
    if api.exists():
        files[api] = with_error_table(api.read_text(encoding="utf-8"))
    return files
