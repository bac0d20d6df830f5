"""What the commands share: the policy directory's default, loading it or exiting with its problems."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ..policy import Policies, PolicyError, load_policies

DEFAULT_POLICIES = os.environ.get("DREAMSEED_POLICIES", "policies")


def load_or_exit(directory: str) -> Policies:
    try:
        return load_policies(directory)
    except PolicyError as exc:
        print(f"dreamseed: {len(exc.problems)} problem(s) in {directory}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(1) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero (a queue of size 0 would be unbounded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def run_until_signalled(main: Coroutine[Any, Any, int], interrupted: Callable[[str], str] = lambda name: "") -> int:
    """Run a command's coroutine. SIGINT (Ctrl-C) or SIGTERM cancels it, so its `finally` blocks
    run (an embedded database it started is stopped), then ``interrupted(signal name)`` says how far
    it got and the exit status is 128 + the signal, as a shell reports a process it stopped."""
    received: list[int] = []

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            if not received:
                received.append(signum)
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop, signum)
        try:
            return await main
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        if not received:
            raise
        name = signal.Signals(received[0]).name
        said = interrupted(name)
        print(f"dreamseed: stopped by {name}" + (f": {said}" if said else ""), file=sys.stderr)
        return 128 + received[0]
