"""A stand-in for `systemctl start vllm-coder`: the `command` actuator's target in tests.

    python tests/backend_ctl.py start|stop|status --dir DIR --port PORT --model MODEL

`start` launches a simulated vLLM server in the background and returns at once (readiness is
the proxy's job to poll); `stop` terminates it; `status` exits 0 while it runs. Every call is
appended to DIR/calls.log, so tests can count starts and stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


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
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    if args.action != "status":
        with (args.dir / "calls.log").open("a") as log:
            log.write(f"{args.action} {time.time():.3f} {os.getppid()}\n")
    if args.action == "status":
        return 0 if pid is not None and alive(pid) else 3
    if args.action == "start":
        if pid is not None and alive(pid):
            return 0
        process = subprocess.Popen(
            [sys.executable, "-m", "dreamseed.simulated_vllm", "--port", args.port, "--model", args.model,
             "--ttft", args.ttft],
            stdout=(args.dir / "backend.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent)
        pidfile.write_text(str(process.pid))
        return 0
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
