"""A stand-in for `systemctl start vllm-coder`: the `command` actuator's target in tests.

    python tests/backend_ctl.py start|stop|status --dir DIR --port PORT --model MODEL

`start` launches a simulated vLLM server in the background and returns at once (readiness is
the proxy's job to poll); `stop` terminates it; `status` exits 0 while it runs. Every call is
appended to DIR/calls.log, so tests can count starts and stops. The process handling is the
product's own (`dreamseed stand-in` uses the same functions); only the call log is added.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dreamseed.standins.simulation import detached_running, start_detached, stop_detached


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ttft", default="0")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    pidfile = args.dir / "pid"
    if args.action == "status":
        return 0 if detached_running(pidfile) else 3
    with (args.dir / "calls.log").open("a") as log:
        log.write(f"{args.action} {time.time():.3f} {os.getppid()}\n")
    if args.action == "start":
        start_detached(pidfile, [sys.executable, "-m", "dreamseed.standins.simulated_vllm", "--port", args.port,
                                 "--model", args.model, "--ttft", args.ttft])
    else:
        stop_detached(pidfile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
