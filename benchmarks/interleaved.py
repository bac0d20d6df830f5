"""Interleaved A/B: several proxies in front of one simulated backend, measured round by round.

    python3 benchmarks/interleaved.py two=2 one=1 floor=floor [--rounds 6] [--stream] ...

Each VARIANT is NAME=SPEC: SPEC is a worker count for `dreamseed serve` as users run it (client
keys, access log to a file, the shipped rules over four backends; test_user_config.py's `user`),
`floor` for bare_forwarder.py, or COUNT@DIR to run the proxy from another checkout's `proxy/`
folder (`git archive OLD proxy | tar -x -C DIR` gives the code before a change). Every round
measures every variant against direct in turn (test_overhead.compare_each, as the user
configuration's benchmarks do), so a stall of a shared machine moves one round of one variant, and
the medians over the rounds are what to read.
benchmarks/README.md's A/B figures come from this.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from harness import KEY, MODEL, Process, Proxied, compare_each, headers_for, shipped_policies, spawn, start_proxy, start_sim

HERE = Path(__file__).resolve().parent

COLUMNS = ("added_p95_ms", "added_ttfb_p95_ms", "throughput_ratio", "proxy_cpu_us_per_request")


def spec_problem(spec: str) -> str | None:
    """What is wrong with a variant's SPEC, before anything is started."""
    if spec == "floor":
        return None
    workers, _, code = spec.partition("@")
    if not workers.isdigit() or int(workers) < 1:
        return "SPEC is a worker count of 1 or more, floor, or COUNT@DIR"
    if code and not (Path(code) / "proxy" / "dreamseed").is_dir():
        return f"{code} has no proxy/dreamseed folder (git archive OLD proxy | tar -x -C {code})"
    return None


def start_variant(spec: str, policies: Path, backend_url: str, log_dir: Path, name: str) -> Process:
    if spec == "floor":
        return spawn([str(HERE / "bare_forwarder.py"), backend_url, MODEL])
    workers, _, code = spec.partition("@")
    env = {"DREAMSEED_API_KEYS": KEY}
    if code:
        env["PYTHONPATH"] = str(Path(code).resolve() / "proxy")
    return start_proxy(policies, env=env, extra=["--access-log-file", str(log_dir / f"{name}.log")],
                       workers=int(workers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=SPEC")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1200, help="requests per variant and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--ttft", type=float, default=0.02, help="the backend's time to first token, seconds")
    parser.add_argument("--token-delay", type=float, default=0.0, help="the backend's time per further token")
    args = parser.parse_args(argv)
    specs = dict(v.split("=", 1) for v in args.variants if "=" in v)
    if len(specs) != len(args.variants):
        parser.error("each variant is NAME=SPEC (SPEC: a worker count, floor, or COUNT@DIR)")
    for name, spec in specs.items():
        problem = spec_problem(spec)
        if problem:
            parser.error(f"variant {name}={spec}: {problem}")

    sim = start_sim(MODEL, tokens=args.tokens)
    sim.configure(ttft=args.ttft, token_delay=args.token_delay, tokens=args.tokens)
    base = Path(tempfile.mkdtemp(prefix="dreamseed-ab-"))
    policies = shipped_policies(base / "policies", sim.url)
    proxies: dict[str, Process] = {}

    def show(round_: int, name: str, figures: dict[str, float]) -> None:
        print(f"round {round_} {name:<8} " + "  ".join(f"{c} {figures[c]:.3f}" for c in COLUMNS), flush=True)

    try:
        for name, spec in specs.items():
            proxies[name] = start_variant(spec, policies, sim.url, base, name)
        results = compare_each(sim, {name: Proxied(proxy, headers_for("user")) for name, proxy in proxies.items()},
                               stream=args.stream, concurrency=args.concurrency, requests=args.requests,
                               rounds=args.rounds, max_tokens=args.tokens, on_round=show)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        sim.stop()
    print("\nmedians over the rounds (throughput: the median proxied rate over the median direct rate)")
    for name, result in results.items():
        print(f"{name:<8} " + "  ".join(f"{c} {result[c]:.3f}" for c in COLUMNS))
    errors = {name: result["errors"] for name, result in results.items()}
    if any(errors.values()):
        print(f"failed requests (direct and proxied), by variant: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
