"""Print the lowest versions pyproject.toml declares for the infra dependencies, as pins
(`name==version`), so CI can install exactly those and run the stack tests on them: a declared
lower bound that does not work fails CI instead of a user's `pip install`."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lowest(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement)
    floor = re.search(r"(?:>=|==)\s*([0-9][^,;\s]*)", requirement)
    if name is None or floor is None:
        raise SystemExit(f"pyproject.toml: {requirement!r} declares no lower bound (>=) to test")
    return f"{name[0]}=={floor[1]}"


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in project["optional-dependencies"]["infra"]:
        print(lowest(requirement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
