"""The ``dreamseed`` command: one module per command group.

serve.py runs the proxy; policies.py checks, plans and explains policies (`policies`, `route`,
`docs`); rag.py is `rag ...`; evaluate.py is `eval answers`; local.py the stand-ins (`local-model setup`, `stand-in`).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import evaluate, local, policies, rag, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamseed", description="DreamSeed: a policy-driven edge proxy for self-hosted LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_command(commands)
    policies.add_commands(commands)
    local.add_commands(commands)
    rag.add_commands(commands)
    evaluate.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`dreamseed route ... | head -1`): not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    raise SystemExit(code)

