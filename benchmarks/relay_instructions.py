"""One variant of the relay called in process, for test_relay_instructions.py to count its machine
instructions under valgrind's callgrind.

    valgrind --tool=callgrind --instr-atstart=no --toggle-collect=functools_reduce \
        python relay_instructions.py BACKEND_URL VARIANT COUNT [--stream]

The app is set up and warmed up (200 requests), then the program prints READY and waits for a
line on standard input: the harness switches callgrind's instrumentation on meanwhile (running the
start-up instrumented would take a minute). The COUNT measured requests then run inside
functools.reduce, the one C function callgrind is told to collect in, so what is counted is those
requests on the event loop's thread and nothing else: not the start-up, not the shutdown, not the
access log's writer thread. Health probes are set an hour apart so none lands in the count.

VARIANT is `user` (test_user_config's: client keys, the access log, metrics, the shipped rules over
four backends), one of `no_keys`, `no_access_log`, `one_rule` (user with one thing changed), or
`floor` (bare_forwarder.py's app: the same connection pool and nothing else). With --stream each
request asks for a stream and is relayed event by event (the backend decides how many).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop
import yaml

from bare_forwarder import forwarder
from dreamseed.asgi import create_app
from dreamseed.logs import AccessLogQueue, set_access_log
from dreamseed.policy import load_policies
from dreamseed.request_path import CLIENT_GONE
from harness import KEY, KEY_HEADER, MODEL, App, chat_body, cpu_per_request, request_scope, running, shipped_policies

HERE = Path(__file__).resolve().parent

VARIANTS = ("user", "no_keys", "no_access_log", "one_rule", "floor")


async def streams(app: App, body: bytes, count: int) -> float:
    """`count` streamed requests one after another, each read to its end; returns the body events
    each brought on average."""
    scope = request_scope(body, [KEY_HEADER])
    # What `dreamseed serve`'s server offers every request (server.py): the client-gone callback,
    # which spares a stream the watcher task other servers need.
    scope["extensions"] = {CLIENT_GONE: {"register": lambda callback: None}}
    events: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        elif message.get("body"):
            events[-1] += 1

    for _ in range(count):
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # Only a server without the extension has a watcher waiting here.
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        events.append(0)
        await app(dict(scope), receive, send)
    assert min(events) > 1, events  # relayed as a stream, not one body
    return sum(events) / count


def main(backend: str, variant: str, count: int, stream: bool = False) -> None:
    if variant not in VARIANTS:
        raise SystemExit(f"relay_instructions.py: VARIANT must be one of {', '.join(VARIANTS)}, not {variant!r}")
    scratch = Path(tempfile.mkdtemp(prefix="dreamseed-instructions-"))
    try:
        measure(backend, variant, count, stream, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure(backend: str, variant: str, count: int, stream: bool, scratch: Path) -> None:
    directory = shipped_policies(scratch / "policies", backend)
    catalog = yaml.safe_load((directory / "backends.yaml").read_text(encoding="utf-8"))
    for backend_settings in catalog["backends"].values():
        backend_settings["health"] = {"interval": 3600}
    (directory / "backends.yaml").write_text(yaml.safe_dump(catalog), encoding="utf-8")
    if variant == "one_rule":
        (directory / "routing.yaml").write_text(
            yaml.safe_dump({"rules": [{"name": "default", "target": "general"}]}), encoding="utf-8")
    environ = {} if variant == "no_keys" else {"DREAMSEED_API_KEYS": KEY}
    app = forwarder(backend, MODEL) if variant == "floor" else \
        create_app(load_policies(directory), environ=environ, watch_policies=False)
    log_file = (scratch / "access.log").open("wb")
    access_log = AccessLogQueue(log_file)
    access_log.start()
    if variant != "no_access_log":
        set_access_log(access_log)
    body = chat_body("auto", stream, 20 if stream else 4)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    lifespan = running(app)
    loop.run_until_complete(lifespan.__aenter__())
    run = streams if stream else cpu_per_request
    loop.run_until_complete(run(app, body, 50 if stream else 200))
    print("READY", flush=True)
    sys.stdin.readline()
    measured = functools.reduce(lambda _, __: loop.run_until_complete(run(app, body, count)), (0, 1))
    if stream:
        print(f"EVENTS {measured}", flush=True)
    loop.run_until_complete(lifespan.__aexit__(None, None, None))
    set_access_log(None)
    access_log.stop()
    log_file.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), "--stream" in sys.argv[4:])
