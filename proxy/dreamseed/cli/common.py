"""What the commands share: the policy directory's default, loading it or exiting with its problems."""

from __future__ import annotations

import argparse
import os
import sys

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
