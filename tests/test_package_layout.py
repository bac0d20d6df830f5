"""The package's shape: no import cycle between its modules (type-checking imports included), no
module-level mutable state for the slot counters, and every module named in the README's layout."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "proxy" / "dreamseed"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module's imports of other modules of the package, read from the source (every import
    statement, those under `if TYPE_CHECKING:` and inside functions too)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # `from .x import y`: y is a module of the package, or a name defined in x.
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                           for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_the_packages_modules() -> None:
    graph = import_graph()
    assert "dreamseed.request_path.chain" in graph["dreamseed.request_path.handle"]  # the graph is read
    assert "dreamseed.states" in graph["dreamseed.metrics"]  # a type-checking import counts too
    assert cycles(graph) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_slot_counters_are_passed_in_not_module_state() -> None:
    source = (PACKAGE / "slots.py").read_text(encoding="utf-8")
    assert not re.search(r"^_[a-z_]+\s*[:=]", source, re.M), "slots.py keeps module-level state"
    assert "global " not in source


def test_the_readme_layout_lists_every_module_of_the_package() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):readme.index("## Dependencies")]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name in ("__init__.py", "__main__.py") and relative.parent != Path("."):
            continue  # a subpackage is listed by its folder
        folder = f"proxy/dreamseed/{relative.parent.as_posix()}/" if relative.parent != Path(".") else None
        listed = f"`proxy/dreamseed/{relative.as_posix()}`" in layout or (
            folder is not None and f"`{folder}`" in layout and f"`{relative.name}`" in layout)
        if not listed and relative.name not in ("__init__.py", "__main__.py"):
            missing.append(relative.as_posix())
    assert missing == [], f"README.md's layout table does not list {missing}"
