"""Pulumi's entry point (Pulumi.yaml: `main: infra/`). Pulumi runs this file with infra/ as the
working directory, so the project root is put on the path to import `infra` and `proxy`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.program import main

main()
