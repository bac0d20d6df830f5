"""`dreamseed serve --workers N`: N proxy processes on one port, seen as one proxy.

The parent binds the port (on Linux one listening socket per worker, in a SO_REUSEPORT group: see
listening_sockets) and starts the stand-in backends, then forks the workers; the kernel hands each
new connection to one of them. What they share, and how:

- /metrics: every second, and before it answers a scrape, each worker writes its counters and
  histograms (metrics.ProxyMetrics's snapshot) and its state gauges (requests in flight and
  queued, the access log's queue) to the workers' shared directory (SharedFiles, in a thread:
  file I/O never runs on the event loop); whichever worker answers a
  scrape adds up every worker's latest, so another worker's requests show within a second, and a
  counter never goes back from one page to the next, whichever worker answers each. A dead
  worker's counts stay in the sum; its gauges do not. Health, circuit and scaler states
  are the answering worker's own (the workers probe the same backends).
- Backend limits: ``max_concurrency`` and ``max_queue`` hold for the backend, whichever worker a
  request reached: the workers count in one shared table (slots.py), and a waiting request gets
  the next free slot in the order the requests came, near enough, whichever worker frees it.
- On-demand backends: the scaler's Postgres advisory locks (scaling/coordination.py) already
  coordinate processes sharing a database; the embedded one is shared by all workers.
- Policy reloads: every worker polls the files; SIGHUP to the parent reaches every worker, and an
  admin reload in one worker asks the parent to pass SIGHUP on, so all swap the same files in.
- Shutdown: SIGTERM or SIGINT to the parent goes to every worker, which drains like a single
  process; the parent waits for them, then stops the stand-ins. A worker that dies is replaced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from .metrics import Counts

if TYPE_CHECKING:
    from prometheus_client.core import Metric

WORKERS_ENV = "DREAMSEED_WORKERS"
SHARED_DIR_ENV = "DREAMSEED_SHARED_DIR"  # the workers' shared directory (cli.cmd_serve makes it)
# State families summed over the workers; the rest are the answering worker's own view.
SUMMED = frozenset({"dreamseed_in_flight_requests", "dreamseed_queued_requests", "dreamseed_access_log_dropped",
                    "dreamseed_access_log_queued"})
STATE_INTERVAL_S = 1.0
STARTUP_FAILURE = 3  # a worker's exit status when its app did not start (uvicorn's own code for it)

log = logging.getLogger("dreamseed.workers")


def worker_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many workers share the port (1 when not started with --workers)."""
    try:
        return max(int(environ.get(WORKERS_ENV, "1")), 1)
    except ValueError:
        return 1


def cores_available(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container started with `--cpus 2` on a 64-core host sees 64 cores but gets the time of 2)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text(encoding="ascii").split()
        if quota != "max":
            cores = min(cores, max(math.ceil(int(quota) / int(period)), 1))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cores


def threads_per_worker(environ: Mapping[str, str] = os.environ) -> int | None:
    """Threads a worker's compute pools (ONNX Runtime's) may use: the cores split between the
    workers, so N workers embedding at once do not run N x cores threads; None with one worker
    (the library's own default, one per core)."""
    workers = worker_count(environ)
    return max(cores_available() // workers, 1) if workers > 1 else None


def shared_directory(environ: Mapping[str, str] = os.environ) -> Path | None:
    found = environ.get(SHARED_DIR_ENV)
    return Path(found) if found and worker_count(environ) > 1 else None


# --- counts and state gauges, summed over the workers --------------------------------------

class SharedFiles:
    """This worker's files in the workers' shared directory (its counts, its state gauges), and
    the other workers' counts. Made in the worker, after the fork."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # The pid and a random part: a replaced worker's counts stay in the sum, and a new worker
        # that happens to get its pid must not overwrite them.
        self.counts_file = directory / f"counts-{os.getpid()}-{os.urandom(4).hex()}.json"
        self._writing = threading.Lock()
        self._written = -1  # the number of the newest snapshot written

    def share(self, counts: Counts, state: Iterable[Metric], number: int) -> None:
        """Write this worker's counts and summed state families: file I/O, so the proxy calls it in
        a thread. `number` orders the snapshots as they were taken: one older than the last
        written is dropped, so the counts in the file never go back."""
        with self._writing:
            if number < self._written:
                return
            _write_whole(self.counts_file, msgspec.json.encode(counts))
            write_state(self.directory, state)
            self._written = number

    def others_counts(self) -> list[Counts]:
        """The latest counts of every other worker of this serve, the dead ones' included."""
        found = []
        for path in self.directory.glob("counts-*.json"):
            if path == self.counts_file:
                continue
            try:
                found.append(msgspec.json.decode(path.read_bytes(), type=Counts))
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # unreadable: skipped for this scrape, never half-added
        return found


def _write_whole(target: Path, data: bytes) -> None:
    """Written to a scratch file, then renamed: a reader sees the old file or the new, never half."""
    scratch = target.with_suffix(".tmp")
    scratch.write_bytes(data)
    scratch.replace(target)


def _shareable(families: Iterable[Metric]) -> list[dict[str, Any]]:
    """The summed families as plain data: what a worker writes, and what merged_state adds up."""
    return [{"name": f.name, "type": f.type, "documentation": f.documentation,
             "samples": [[s.labels, s.value] for s in f.samples]} for f in families if f.name in SUMMED]


def write_state(directory: Path, families: Iterable[Metric]) -> None:
    """This worker's summed families, for the others to read (written whole, then renamed)."""
    _write_whole(directory / f"state-{os.getpid()}.json", json.dumps(_shareable(families)).encode())


def merged_state(directory: Path, own: Iterable[Metric]) -> Iterator[Metric]:
    """This worker's state families, the summed ones added up with every other live worker's."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    own = list(own)
    yield from (family for family in own if family.name not in SUMMED)
    shared = [_shareable(own)]
    for path in directory.glob("state-*.json"):
        pid = int(path.stem.removeprefix("state-"))
        if pid == os.getpid() or not _alive(pid):
            continue
        try:
            shared.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # being replaced right now: its next write counts
    totals: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    kinds: dict[str, tuple[str, str]] = {}  # name -> (type, documentation)
    for family in (family for worker in shared for family in worker):
        kinds.setdefault(family["name"], (family["type"], family["documentation"]))
        bucket = totals.setdefault(family["name"], {})
        for labels, value in family["samples"]:
            key = tuple(sorted(labels.items()))
            bucket[key] = bucket.get(key, 0.0) + value
    for name, samples in totals.items():
        kind, documentation = kinds[name]
        label_names = sorted({k for key in samples for k, _ in key})
        metric: GaugeMetricFamily | CounterMetricFamily = (
            CounterMetricFamily(name, documentation, labels=label_names) if kind == "counter"
            else GaugeMetricFamily(name, documentation, labels=label_names))
        for key, value in samples.items():
            labels = dict(key)
            metric.add_metric([labels.get(n, "") for n in label_names], value)
        yield metric


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ask_parent_to_reload() -> None:
    """From a worker: have the parent pass SIGHUP to every worker (so all reload, not only this one)."""
    if worker_count() > 1 and os.getppid() > 1:
        os.kill(os.getppid(), signal.SIGHUP)


# --- the parent ---------------------------------------------------------------------------


LISTEN_BACKLOG = 2048  # connections queue here until a worker's startup completes


def listening_sockets(host: str, port: int, workers: int) -> list[socket.socket]:
    """The bound, listening sockets the workers serve on: one per worker in a SO_REUSEPORT group on
    Linux, else one that all share.

    Why one each: on a shared socket every idle worker is woken for a new connection, and the first
    to run accepts all that are waiting (uvloop accepts until the queue is empty). Clients open their
    keep-alive connections in a burst (an SDK's pool, a load generator), so one worker often got
    most of them and the other core sat idle for their whole life. With SO_REUSEPORT the
    kernel picks a socket for each connection by a hash of its addresses: an even split on average.
    (Not on macOS and the BSDs, where the option does not balance: there the workers share one
    socket.) The parent keeps every socket open, so connections that reach a worker that died wait
    for its replacement, which serves on the same socket, instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    each = workers if workers > 1 and sys.platform.startswith("linux") else 1
    if each > 1:
        # A SO_REUSEPORT bind succeeds beside any listener of this user that set the option too,
        # another `serve --workers N` on the same port included: the two would split the traffic.
        # A bind without the option fails while anything holds the port, so one comes first (and
        # picks the port when asked for port 0).
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
    sockets: list[socket.socket] = []
    try:
        for _ in range(each):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if each > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))  # with several, the probe's port: port 0 is resolved once, above
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _reap(children: dict[int, int]) -> list[tuple[int, int]]:
    """(pid, exit code) of the workers that have exited. Only the workers' pids are waited for:
    the parent's other children (the stand-in backends) belong to their own Popen objects."""
    exited = []
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            exited.append((pid, 0))
            continue
        if done:
            exited.append((pid, os.waitstatus_to_exitcode(status)))
    return exited


class Supervisor:
    """The parent of `serve --workers N`: forks the workers, passes SIGTERM, SIGINT and SIGHUP on,
    replaces a worker that dies while serving (after `forget(index)` has cleared what it held),
    and returns once all have exited after a stop."""

    def __init__(self, workers: int, run_worker: Callable[[int], int], grace_s: float,
                 forget: Callable[[int], None] = lambda index: None) -> None:
        self.workers = workers
        self.run_worker = run_worker
        self.grace_s = grace_s
        self.forget = forget
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.result = 0
        self._restarts: list[float] = []

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._pass_on) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            for index in range(self.workers):
                self._spawn(index)
            deadline: float | None = None
            while self.children:
                exited = _reap(self.children)
                if exited:
                    for pid, code in exited:
                        self._exited(pid, code)
                    continue
                if self.stopping and deadline is None:
                    deadline = time.monotonic() + self.grace_s + 10
                if deadline is not None and time.monotonic() > deadline:
                    for child in self.children:  # past the grace period: no more waiting
                        os.kill(child, signal.SIGKILL)
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.result

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = self.run_worker(index)
            except SystemExit as exc:  # uvicorn exits with STARTUP_FAILURE when the app cannot start
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                os._exit(code)
        self.children[pid] = index

    def _pass_on(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    def _exited(self, pid: int, code: int) -> None:
        index = self.children.pop(pid)
        if self.stopping:
            return
        if code == STARTUP_FAILURE:  # would fail again: stop them all, and say so in the exit status
            log.error("worker %d could not start; stopping", index)
            self.result = STARTUP_FAILURE
            self._pass_on(signal.SIGTERM, None)
            return
        # A worker died while serving: replace it, unless they keep dying (then stop all).
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        log.warning("worker %d (pid %d) exited with status %d; starting another", index, pid, code)
        self.forget(index)
        if len(self._restarts) > 5 * self.workers:
            log.error("workers keep dying: stopping")
            self._pass_on(signal.SIGTERM, None)
            return
        self._spawn(index)
