"""`dreamseed serve --workers 2`: two processes on one port, one proxy to its users and to Prometheus.

Real processes and sockets: the proxy under test, a simulated vLLM behind it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from support import Sim, free_port, start_proxy, start_sim, write_policies

MODEL = "sim/general"


@pytest.fixture
def sim() -> Sim:
    backend = start_sim(MODEL)
    yield backend
    backend.stop()


def policies_for(sim: Sim, directory: Path, max_concurrency: int = 8) -> Path:
    return write_policies(directory, {"general": {"url": sim.url, "model": MODEL, "context_length": 4096,
                                                  "max_concurrency": max_concurrency, "max_queue": 64,
                                                  "timeouts": {"connect": 5, "read": 60, "write": 30, "pool": 60}}},
                          routing={"rules": [{"name": "default", "target": "general"}]})


def send_in_background(url: str, content: str, count: int) -> tuple[list[threading.Thread], list[int]]:
    """`count` chat requests at once, each on its own connection; their statuses land in the list."""
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    results: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=30) as client:
            results.append(client.post(f"{url}/v1/chat/completions", json=body).status_code)

    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads, results


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a /metrics page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def worker_pids(proxy_pid: int) -> set[int]:
    """The proxy's forked workers (same command line as the proxy; stand-in backends run other modules)."""
    children = Path(f"/proc/{proxy_pid}/task/{proxy_pid}/children").read_text().split()
    return {int(pid) for pid in children
            if "dreamseed.cli" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")}


def shared_counts(pids: set[int]) -> dict[int, float]:
    """Requests each worker has shared in its counts file (workers.SharedFiles), by pid."""
    found: dict[int, float] = {}
    for pid in pids:
        for path in Path(tempfile.gettempdir()).glob(f"dreamseed-workers-*/counts-{pid}-*.json"):
            counts = json.loads(path.read_bytes())
            found[pid] = sum(cell[0] for _, cell in counts["dreamseed_requests"])
    return found


def scrape_until(url: str, done: Callable[[str], bool], timeout: float = 5.0) -> str:
    """A /metrics page on which `done` holds: the workers share their counts every second."""
    deadline = time.monotonic() + timeout
    while True:
        with httpx.Client() as client:
            page = client.get(f"{url}/metrics").text
        if done(page) or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def test_two_workers_share_the_port_and_answer_metrics_as_one(sim: Sim, tmp_path: Path) -> None:
    proxy = start_proxy(policies_for(sim, tmp_path / "p"), extra=["--workers", "2"])
    try:
        workers = worker_pids(proxy.popen.pid)
        assert len(workers) == 2
        body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
        for _ in range(40):
            # A new connection each time: the kernel spreads them over the workers.
            with httpx.Client() as client:
                response = client.post(f"{proxy.url}/v1/chat/completions", json=body)
                assert response.status_code == 200
        scrape_until(proxy.url, lambda page: sample(page, "dreamseed_requests_total", status="200") == 40)
        for _ in range(8):
            with httpx.Client() as client:
                page = client.get(f"{proxy.url}/metrics").text
            # Every scrape, whichever worker answers it, counts all 40 requests.
            assert sample(page, "dreamseed_requests_total", backend="general", status="200") == 40
            assert sample(page, "dreamseed_request_duration_seconds_count", backend="general") == 40
        # Both workers served requests (so the pages above are sums, not one worker's view).
        shared = shared_counts(workers)
        assert sorted(shared) == sorted(workers) and all(shared.values()) and sum(shared.values()) == 40, shared
    finally:
        proxy.stop()


def connections_by_worker(workers: set[int], port: int) -> dict[int, int]:
    """Established connections to `port` that each worker holds (from /proc: its socket inodes,
    and the IPv4 TCP table's entries for the port)."""
    established: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            established.add(fields[9])
    held: dict[int, int] = {}
    for pid in workers:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed while we looked
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        held[pid] = len(inodes & established)
    return held


def open_and_ask(url: str, count: int, look: Callable[[], dict[int, int]] = dict) -> tuple[list[bytes], dict[int, int]]:
    """`count` keep-alive connections opened at once, as a client's pool opens them, each asked one
    request (so its worker has accepted it): their status lines, and what `look` saw while all
    were still open."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n").encode() + body

    async def one() -> tuple[asyncio.StreamWriter, bytes]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        return writer, await asyncio.wait_for(reader.readline(), 30)

    async def run() -> tuple[list[bytes], dict[int, int]]:
        opened = await asyncio.gather(*(one() for _ in range(count)))
        seen = look()
        for writer, _ in opened:
            writer.close()
        return [status for _, status in opened], seen

    return asyncio.run(run())


def test_connections_opened_at_once_are_spread_over_the_workers(sim: Sim, tmp_path: Path) -> None:
    """A client's pool opens its connections in a burst. On one shared listening socket the first
    worker to wake accepted all that were waiting (0/16 and 2/14 over two workers, often): the
    other core idled for the connections' whole life. One socket per worker (SO_REUSEPORT) lets
    the kernel pick a worker for each connection: four bursts of 32, each worker gets some of
    every burst (fewer than 4 of 32 by chance: about once in 10^6 bursts)."""
    proxy = start_proxy(policies_for(sim, tmp_path / "p"), extra=["--workers", "2"])
    try:
        workers = worker_pids(proxy.popen.pid)
        port = int(proxy.url.rsplit(":", 1)[1])
        splits = []
        for _ in range(4):
            statuses, held = open_and_ask(proxy.url, 32, lambda: connections_by_worker(workers, port))
            assert all(status.startswith(b"HTTP/1.1 200") for status in statuses), statuses
            assert sum(held.values()) == 32, held
            splits.append(sorted(held.values()))
            time.sleep(0.2)  # the workers see the closes
        assert all(fewer >= 4 for fewer, _ in splits), splits
    finally:
        proxy.stop()


def test_connections_waiting_on_a_worker_that_dies_are_served_by_its_replacement(sim: Sim, tmp_path: Path) -> None:
    """The parent holds every worker's listening socket, so connections the kernel has handed to a
    worker that dies before accepting them wait for its replacement, which serves the same socket:
    none refused, none reset (a socket of the worker's own would have died with it)."""
    proxy = start_proxy(policies_for(sim, tmp_path / "p"), extra=["--workers", "2"])
    try:
        port = int(proxy.url.rsplit(":", 1)[1])
        victim = min(worker_pids(proxy.popen.pid))
        os.kill(victim, signal.SIGSTOP)  # accepts nothing: its share of the burst waits on its socket
        answered: list[list[bytes]] = []
        burst = threading.Thread(target=lambda: answered.append(open_and_ask(proxy.url, 24)[0]))
        burst.start()
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        burst.join(timeout=60)
        assert answered and all(status.startswith(b"HTTP/1.1 200") for status in answered[0]), answered
        workers = worker_pids(proxy.popen.pid) - {victim}
        assert len(workers) == 2
        statuses, held = open_and_ask(proxy.url, 32, lambda: connections_by_worker(workers, port))
        assert all(status.startswith(b"HTTP/1.1 200") for status in statuses)
        assert min(held.values()) > 0, held  # the replacement serves its socket's share
    finally:
        proxy.stop()


def test_a_killed_workers_counts_stay_in_the_sum(sim: Sim, tmp_path: Path) -> None:
    """Counters never go back: a worker killed outright is replaced, and what it had shared stays
    in every page, under the replacement's own counts."""
    proxy = start_proxy(policies_for(sim, tmp_path / "p"), extra=["--workers", "2"])
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}

    def send(count: int) -> None:
        for _ in range(count):
            with httpx.Client() as client:  # a new connection each time: both workers serve
                assert client.post(f"{proxy.url}/v1/chat/completions", json=body).status_code == 200

    def total(page: str) -> float:
        return sample(page, "dreamseed_requests_total", backend="general", status="200")

    try:
        workers = worker_pids(proxy.popen.pid)
        send(30)
        scrape_until(proxy.url, lambda page: total(page) == 30)
        time.sleep(1.2)  # both have shared their latest counts
        victim = max(workers, key=lambda pid: shared_counts({pid}).get(pid, 0))
        assert shared_counts({victim})[victim] > 0
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(worker_pids(proxy.popen.pid) - {victim}) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(worker_pids(proxy.popen.pid) - {victim}) == 2  # replaced
        for _ in range(6):
            with httpx.Client() as client:
                assert total(client.get(f"{proxy.url}/metrics").text) == 30
        send(10)
        assert total(scrape_until(proxy.url, lambda page: total(page) == 40)) == 40
    finally:
        proxy.stop()


def test_counters_never_go_back_from_one_scrape_to_the_next_whichever_worker_answers(sim: Sim, tmp_path: Path) -> None:
    """Prometheus reads a counter that goes down as a restart of the process and makes up a jump
    in rate(): consecutive scrapes, answered by either worker while both serve, must never go
    back (a worker that added its own live counts to the others' last shared ones did)."""
    proxy = start_proxy(policies_for(sim, tmp_path / "p"), extra=["--workers", "2"])
    body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            with httpx.Client() as client:  # a new connection each time: both workers serve
                client.post(f"{proxy.url}/v1/chat/completions", json=body)

    senders = [threading.Thread(target=traffic) for _ in range(2)]
    try:
        for sender in senders:
            sender.start()
        totals = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            with httpx.Client() as client:  # a new connection each time: either worker answers
                page = client.get(f"{proxy.url}/metrics").text
            totals.append(sample(page, "dreamseed_requests_total", backend="general", status="200"))
            time.sleep(0.05)
        assert totals[-1] > totals[0]
        went_back = [(a, b) for a, b in zip(totals, totals[1:], strict=False) if b < a]
        assert not went_back, went_back
    finally:
        stop.set()
        for sender in senders:
            sender.join()
        proxy.stop()


def test_in_flight_requests_are_summed_over_the_workers(sim: Sim, tmp_path: Path) -> None:
    sim.configure(ttft=3.0)  # requests stay in flight (or queued, up to pool: 60 s) while we look
    proxy = start_proxy(policies_for(sim, tmp_path / "p", max_concurrency=4), extra=["--workers", "2"])
    try:
        threads, results = send_in_background(proxy.url, "slow", 8)
        time.sleep(2.0)  # all sent; each worker has shared its state (every second)
        assert sim.stats()["active"] == 4  # the backend's limit, whichever worker holds the slots
        totals = []
        for _ in range(6):
            with httpx.Client() as client:
                page = client.get(f"{proxy.url}/metrics").text
            totals.append(sample(page, "dreamseed_in_flight_requests", backend="general")
                           + sample(page, "dreamseed_queued_requests", backend="general"))
        assert totals == [8.0] * 6  # one view: every request, from whichever worker answers
        for thread in threads:
            thread.join()
        assert results == [200] * 8
    finally:
        proxy.stop()


def test_a_policy_reload_reaches_every_worker(sim: Sim, tmp_path: Path) -> None:
    policies = policies_for(sim, tmp_path / "p")
    # No file watching: only the admin call reloads, and it must reach both workers.
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "workers-admin"},
                        extra=["--workers", "2", "--no-watch-policies"])
    admin = {"authorization": "Bearer workers-admin"}
    try:
        def hashes() -> set[str]:
            seen = set()
            for _ in range(12):
                with httpx.Client(headers=admin) as client:
                    seen.add(client.get(f"{proxy.url}/admin/policies").json()["policy_hash"])
            return seen

        (before,) = hashes()
        routing = policies / "routing.yaml"
        routing.write_text(routing.read_text().replace("name: default", "name: everything"))
        with httpx.Client(headers=admin) as client:
            assert client.post(f"{proxy.url}/admin/policies/reload").status_code == 200
        deadline = time.monotonic() + 10
        while (seen := hashes()) != {next(iter(seen))} or before in seen:
            assert time.monotonic() < deadline, seen  # the other worker reloaded too (SIGHUP via the parent)
            time.sleep(0.2)
    finally:
        proxy.stop()


def test_a_backends_limits_hold_across_more_workers_than_its_slots(sim: Sim, tmp_path: Path) -> None:
    """Three workers in front of a backend that takes 2 at once and queues 3: nine requests at once
    (each on its own connection, spread over the workers by the kernel) give the backend 2 at a
    time, 5 answers in all, and 4 refusals with 429, as one process would."""
    sim.configure(ttft=1.5)  # the first two hold their slots until all nine have arrived
    policies = write_policies(tmp_path / "p", {"general": {
        "url": sim.url, "model": MODEL, "context_length": 4096, "max_concurrency": 2, "max_queue": 3,
        "timeouts": {"connect": 5, "read": 60, "write": 30, "pool": 60}}},
        routing={"rules": [{"name": "default", "target": "general"}]})
    proxy = start_proxy(policies, extra=["--workers", "3"])
    try:
        assert len(worker_pids(proxy.popen.pid)) == 3
        sim.reset()
        sim.configure(ttft=1.5)
        threads, results = send_in_background(proxy.url, "slow", 9)
        for thread in threads:
            thread.join()
        assert sorted(results) == [200] * 5 + [429] * 4
        stats = sim.stats()
        assert stats["peak_active"] == 2 and stats["finished"] == 5
        with httpx.Client() as client:  # and every slot came back: the next requests are answered
            sim.configure(ttft=0.0)
            for _ in range(6):
                assert client.post(f"{proxy.url}/v1/chat/completions", json={
                    "model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200
    finally:
        proxy.stop()


def test_sigterm_drains_every_worker_and_stops_the_parent(sim: Sim, tmp_path: Path) -> None:
    sim.configure(ttft=0.8)
    proxy = start_proxy(policies_for(sim, tmp_path / "p"), extra=["--workers", "2"])
    workers = worker_pids(proxy.popen.pid)
    threads, results = send_in_background(proxy.url, "finish me", 4)
    time.sleep(0.3)  # in flight now
    os.kill(proxy.popen.pid, signal.SIGTERM)
    for thread in threads:
        thread.join()
    assert results == [200] * 4  # in-flight requests finished
    assert proxy.popen.wait(timeout=20) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_workers_with_stand_in_backends_stop_cleanly(tmp_path: Path) -> None:
    """The README's main job with --workers: the stand-ins are the parent's children too, and must
    not be mistaken for workers (or reaped from under their owner) when they or the workers exit."""
    policies = write_policies(tmp_path / "p", {"general": {"url": f"http://127.0.0.1:{free_port()}", "model": MODEL,
                                                           "context_length": 4096}},
                              routing={"rules": [{"name": "default", "target": "general"}]})
    proxy = start_proxy(policies, extra=["--workers", "2", "--simulate-missing"])
    with httpx.Client(timeout=30) as client:
        answer = client.post(f"{proxy.url}/v1/chat/completions",
                             json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200 and "Simulated" in answer.text
    # A stand-in that dies is the parent's child too: the parent must go on supervising its workers.
    children = {int(c) for c in Path(f"/proc/{proxy.popen.pid}/task/{proxy.popen.pid}/children").read_text().split()}
    (stand_in,) = children - worker_pids(proxy.popen.pid)
    os.kill(stand_in, signal.SIGKILL)
    time.sleep(1.0)
    assert proxy.popen.poll() is None and len(worker_pids(proxy.popen.pid)) == 2
    os.kill(proxy.popen.pid, signal.SIGTERM)
    assert proxy.popen.wait(timeout=30) == 0
    assert "Traceback" not in proxy.log(), proxy.log()[-2000:]


def test_the_default_is_one_worker_per_core_a_cgroup_quota_included(sim: Sim, tmp_path: Path) -> None:
    from dreamseed.workers import cores_available

    affinity = len(os.sched_getaffinity(0))
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert cores_available(cgroup) == affinity  # no cpu.max: the affinity
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert cores_available(cgroup) == affinity
    (cgroup / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert cores_available(cgroup) == min(affinity, 2)
    (cgroup / "cpu.max").write_text("20000 100000\n")
    assert cores_available(cgroup) == 1

    proxy = start_proxy(policies_for(sim, tmp_path / "p"), workers=None)
    try:
        expected = cores_available()
        assert len(worker_pids(proxy.popen.pid)) == (expected if expected > 1 else 0)
        assert any(f", {expected} workers)" in line for line in proxy.lines) == (expected > 1)
    finally:
        proxy.stop()


def test_a_backend_busy_at_its_limit_stays_healthy_and_its_probes_queue_no_request(sim: Sim, tmp_path: Path) -> None:
    """Probes have connections of their own: a backend whose one slot is held for 3 s by a request
    is probed on time by both workers (not behind the request, where a 1 s probe timeout would open the circuit),
    and nothing but the request counts as in flight or queued."""
    sim.configure(ttft=3.0)
    policies = write_policies(tmp_path / "p", {"general": {
        "url": sim.url, "model": MODEL, "context_length": 4096, "max_concurrency": 1, "max_queue": 8,
        "health": {"interval": 0.2, "timeout": 1, "unhealthy_threshold": 1},
        "timeouts": {"connect": 5, "read": 60, "write": 30, "pool": 60}}},
        routing={"rules": [{"name": "default", "target": "general"}]})
    proxy = start_proxy(policies, env={"DREAMSEED_ADMIN_KEY": "k"}, extra=["--workers", "2"])
    try:
        threads, results = send_in_background(proxy.url, "slow", 1)
        time.sleep(2.2)  # ten probe intervals while the request holds the only slot
        with httpx.Client(headers={"authorization": "Bearer k"}) as client:
            general = client.get(f"{proxy.url}/admin/backends").json()["backends"]["general"]
            page = client.get(f"{proxy.url}/metrics").text
        assert general["state"] == "up" and general["circuit"] == "closed", general
        assert sample(page, "dreamseed_in_flight_requests", backend="general") == 1.0
        assert sample(page, "dreamseed_queued_requests", backend="general") == 0.0
        for thread in threads:
            thread.join()
        assert results == [200]
    finally:
        proxy.stop()


def test_sharing_a_workers_metrics_never_stalls_its_event_loop(sim: Sim, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are written in a thread: with a write that takes 0.5 s (a disk that stalls), the
    event loop still runs its timers on time, and the file is there once the share is done."""
    import asyncio

    from dreamseed import workers
    from dreamseed.policy import load_policies
    from dreamseed.service import Service

    shared = tmp_path / "shared"
    shared.mkdir()
    environ = {"DREAMSEED_WORKERS": "2", "DREAMSEED_SHARED_DIR": str(shared)}
    proxy = Service(load_policies(policies_for(sim, tmp_path / "p")), environ, {}, log_prompts=False)
    proxy.metrics.requests.inc("default", "general", "200")
    written = workers.write_state

    def slow(directory: Path, families: object) -> None:
        time.sleep(0.5)
        written(directory, families)  # type: ignore[arg-type]

    monkeypatch.setattr(workers, "write_state", slow)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        assert proxy._shared is not None
        sharing = asyncio.ensure_future(proxy._share(proxy._shared))
        began = loop.time()
        await asyncio.sleep(0.02)
        late = loop.time() - began - 0.02
        await sharing
        return late

    assert asyncio.run(run()) < 0.2
    files = list(shared.glob("counts-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_bytes())["dreamseed_requests"] == [[["default", "general", "200"], [1.0]]]
    assert list(shared.glob("state-*.json"))


def test_an_older_snapshot_written_late_never_replaces_a_newer_one(tmp_path: Path) -> None:
    from dreamseed.workers import SharedFiles

    shared = SharedFiles(tmp_path)
    shared.share({"dreamseed_requests": [(["r", "b", "200"], [7.0])]}, [], number=2)
    shared.share({"dreamseed_requests": [(["r", "b", "200"], [5.0])]}, [], number=1)
    assert json.loads(shared.counts_file.read_bytes())["dreamseed_requests"] == [[["r", "b", "200"], [7.0]]]
    shared.share({"dreamseed_requests": [(["r", "b", "200"], [9.0])]}, [], number=3)
    assert json.loads(shared.counts_file.read_bytes())["dreamseed_requests"] == [[["r", "b", "200"], [9.0]]]
    assert SharedFiles(tmp_path).others_counts() == [{"dreamseed_requests": [(["r", "b", "200"], [9.0])]}]
