"""`dreamseed policies diff --traffic` at CI scale: 100,000 recorded requests (the sample traffic
repeated, with times kept increasing) read from a file and replayed through two policy generations,
the seed's and one with a moved keyword and a changed length threshold, the way the command does it
(read_traffic, then replay)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dreamseed.policy import load_policies
from dreamseed.replay import read_traffic, replay
from harness import MODE, ROOT, SEED_POLICIES

REQUESTS = 100_000


def test_replay_100k_requests(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sample = (ROOT / "docs" / "examples" / "traffic.jsonl").read_text(encoding="utf-8").splitlines()
    traffic = tmp_path / "traffic.jsonl"
    with traffic.open("w", encoding="utf-8") as out:
        for index in range(REQUESTS):
            line = json.loads(sample[index % len(sample)])
            line["ts"] += 40_000 * (index // len(sample))  # the next day's copy of the sample
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    head = tmp_path / "head"
    shutil.copytree(SEED_POLICIES, head)
    routing = head / "routing.yaml"
    routing.write_text(routing.read_text(encoding="utf-8").replace("chars_over: 2000", "chars_over: 3000")
                       .replace("sql, regex", "regex"), encoding="utf-8")
    base, changed = load_policies(SEED_POLICIES), load_policies(head)

    def run() -> tuple[float, float, int]:
        started = time.perf_counter()
        read = read_traffic(traffic)
        parsed = time.perf_counter()
        result = replay(base, changed, read)
        return parsed - started, time.perf_counter() - parsed, sum(result.moved.values())

    read_s, replay_s, moved = benchmark.pedantic(run, rounds=1 if MODE == "short" else 3, iterations=1)
    assert moved > 0
    benchmark.extra_info.update({"requests": REQUESTS, "read_s": read_s, "replay_s": replay_s,
                                 "total_s": read_s + replay_s, "requests_per_second": REQUESTS / (read_s + replay_s)})
