"""The relay's own CPU per request, without a server or a load generator in the way.

The proxy's ASGI app as users run it (client keys, the access log to a file, metrics, the shipped
routing rules over four backends: test_user_config's `user`) is called in this process, one request
at a time, against the simulated backend over the real connection pool; beside it, in the same
rounds, bare_forwarder.py's app (the same pool, nothing else). What this process spends per request
is the relay's CPU, the bare forwarder's is the floor, and the difference is what the features cost.

The end-to-end measures (test_user_config.py) share two cores among the load generator, the
backend and the proxy, and their CPU figures move by 10-20% between runs of one commit; this one
moves by a few percent, so it is the figure to read when a change to the request path is meant to
save a few microseconds (benchmarks/README.md, item 6).
"""

from __future__ import annotations

from pathlib import Path

import uvloop

from bare_forwarder import forwarder
from dreamseed.asgi import create_app
from dreamseed.logs import AccessLogQueue, set_access_log
from dreamseed.policy import load_policies
from harness import KEY, MODEL, BenchStack, chat_body, cpu_per_request, running, shipped_policies


def test_relay_in_process(benchmark, bench_stack: BenchStack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = bench_stack.sim
    sim.configure(ttft=0.0, token_delay=0.0, tokens=4)
    policies = load_policies(shipped_policies(tmp_path / "policies", sim.url))
    user = create_app(policies, environ={"DREAMSEED_API_KEYS": KEY}, watch_policies=False)
    floor = forwarder(sim.url, MODEL)
    body = chat_body("auto", False, 4)
    count, rounds = bench_stack.scale(short=1500, full=5000), bench_stack.scale(short=3, full=5)
    access_log = AccessLogQueue((tmp_path / "access.log").open("wb"))

    async def measure() -> dict[str, float]:
        figures: dict[str, list[float]] = {"user": [], "floor": []}
        async with running(user), running(floor):
            for app in (user, floor):  # warm up: connections, caches, the interpreter's specialisations
                await cpu_per_request(app, body, 200)
            for _ in range(rounds):
                figures["user"].append(await cpu_per_request(user, body, count))
                figures["floor"].append(await cpu_per_request(floor, body, count))
        best = {name: min(values) * 1e6 for name, values in figures.items()}  # least disturbed round
        return {"user_cpu_us": best["user"], "floor_cpu_us": best["floor"],
                "features_cpu_us": best["user"] - best["floor"], "user_over_floor": best["user"] / best["floor"]}

    access_log.start()
    set_access_log(access_log)
    try:
        result = benchmark.pedantic(lambda: uvloop.run(measure()), rounds=1, iterations=1)
    finally:
        set_access_log(None)
        access_log.stop()
        sim.configure(ttft=0.02, token_delay=0.0, tokens=16)  # the other suites' shape
    benchmark.extra_info.update(result)
    lines = (tmp_path / "access.log").read_bytes().count(b"\n")
    assert lines >= count * rounds, lines  # the user configuration really logged every request
