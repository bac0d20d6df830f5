"""Backend slots shared by the workers of one ``serve --workers N``: the catalog's limits hold for
the backend, not for each worker.

A backend's ``max_concurrency`` (requests in flight) and ``max_queue`` (requests waiting for one of
them) are what the backend can take, whichever worker the kernel handed a client's connection to.
So the workers count in one table: an anonymous shared memory map the parent makes before it forks,
guarded by one process-shared lock (a POSIX semaphore), held for a few reads and writes at a time.

Per backend the table holds the totals (slots taken, requests waiting) and, per worker, its slots,
its waiters, the arrival time of its oldest waiter and the slots granted to it but not yet handed
to a waiter. Taking a free slot is one locked update. A worker that finds none free queues the
request on its own event loop. Giving a slot back passes it to the worker whose oldest waiter came
first: to its own waiter at once, or to another worker as a grant plus one byte on that worker's
wake-up pipe (its loop reads the pipe and hands the grant to its oldest waiter). So the wait is
first come, first served across the workers, near enough: exactly so within one worker, and by
each worker's oldest waiter across them.

A worker that dies takes its slots with it: the parent clears its column before replacing it
(``Table.forget``). One process (no ``--workers``) does not use this module: its pools count alone
(transport.LocalSlots). The parent makes the :class:`Table`; each worker passes its
:class:`WorkerSlots` down to its backends' pools.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mmap
import multiprocessing
import os
import time
from collections import deque

import httpx

from .transport import QueueFull

log = logging.getLogger("dreamseed.slots")

MAX_BACKENDS = 64  # distinct backend names a `serve` sees over its life, reloads included
NAME_BYTES = 32  # an entry is found by a digest of the backend's name (names have no length limit)
_HEAD = 3  # per backend: slots taken (grants included), requests waiting (granted ones included), grants
_PER_WORKER = 4  # per worker: slots held, requests waiting, oldest waiter's arrival (ns), slots granted
_HELD, _WAITING, _OLDEST, _GRANTED = range(_PER_WORKER)
_UNUSED = b"\0" * NAME_BYTES  # an entry no backend has taken yet


class Table:
    """The shared counters; made by the parent before the workers are forked."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._ints = _HEAD + _PER_WORKER * workers
        self._entry_bytes = NAME_BYTES + 8 * self._ints
        self._memory = mmap.mmap(-1, self._entry_bytes * MAX_BACKENDS)  # anonymous: MAP_SHARED, zeroed
        self.lock = multiprocessing.Lock()
        # One wake-up pipe per worker index (a replaced worker takes over its predecessor's).
        self.pipes = [os.pipe() for _ in range(workers)]
        for read_end, write_end in self.pipes:
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)

    def counters(self, name: str) -> memoryview:
        """The int64 counters of a backend, its entry made on first use (call with the lock held)."""
        encoded = hashlib.blake2b(name.encode("utf-8"), digest_size=NAME_BYTES).digest()
        for index in range(MAX_BACKENDS):
            start = index * self._entry_bytes
            found = self._memory[start:start + NAME_BYTES]
            if found == encoded or found == _UNUSED:
                self._memory[start:start + NAME_BYTES] = encoded
                return self._counts_at(start)
        raise RuntimeError(f"more than {MAX_BACKENDS} backend names in one serve: restart it")

    def _counts_at(self, start: int) -> memoryview:
        return memoryview(self._memory)[start + NAME_BYTES:start + self._entry_bytes].cast("q")

    def _entries(self) -> list[memoryview]:
        starts = (index * self._entry_bytes for index in range(MAX_BACKENDS))
        return [self._counts_at(start) for start in starts if self._memory[start:start + NAME_BYTES] != _UNUSED]

    def forget(self, worker: int) -> None:
        """A dead worker's slots and waiters no longer count (its requests died with it); its slots
        go to the other workers' waiters."""
        if not self.lock.acquire(timeout=1.0):
            # Held for a second: by the dead worker, killed inside a few-microsecond update (the
            # live ones never hold it longer). Left so, it would stop every worker for good: take
            # it over (a semaphore may be released by any process) and put its column right below.
            log.error("worker %d died holding the slot table's lock: taking it over", worker)
            self.lock.release()
            self.lock.acquire()
        base = _HEAD + _PER_WORKER * worker
        try:
            for counts in self._entries():
                freed = counts[base + _HELD] + counts[base + _GRANTED]
                counts[1] -= counts[base + _WAITING]
                counts[2] -= counts[base + _GRANTED]
                for offset in range(_PER_WORKER):
                    counts[base + offset] = 0
                for _ in range(freed):
                    chosen = _pass_on(counts)
                    if chosen >= 0:
                        self.wake_up((chosen - _HEAD) // _PER_WORKER)
        finally:
            self.lock.release()
        _drain(self.pipes[worker][0])

    def wake_up(self, worker: int) -> None:
        """Tell a worker's loop that slots were granted to it."""
        try:
            os.write(self.pipes[worker][1], b"\1")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the worker will find every grant


def _pass_on(counts: memoryview) -> int:
    """A slot given back (with the lock held): granted to the worker whose oldest waiter came first,
    whose base index is returned, or freed (-1) when nobody waits without a grant on its way."""
    chosen, oldest = -1, 0
    if counts[1] > counts[2]:
        for base in range(_HEAD, len(counts), _PER_WORKER):
            if counts[base + _WAITING] > counts[base + _GRANTED] and (chosen < 0 or counts[base + _OLDEST] < oldest):
                chosen, oldest = base, counts[base + _OLDEST]
    if chosen < 0:
        counts[0] -= 1
    else:
        counts[chosen + _GRANTED] += 1
        counts[2] += 1
    return chosen


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class SharedSlots:
    """One backend's slots as seen from one worker: the pool's SlotCounter when the table is shared."""

    def __init__(self, table: Table, worker: int, name: str, limit: int, max_queue: int | None) -> None:
        self.name = name
        self.limit = limit
        self.max_queue = max_queue
        self._table = table
        self._lock = table.lock
        self._me = _HEAD + _PER_WORKER * worker
        with self._lock:
            self._counts = table.counters(name)
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()  # (waiter, arrival ns)
        self.in_use = 0  # this worker's requests holding a slot
        self.waiting = 0  # this worker's requests waiting for one

    async def acquire(self, timeout: float | None) -> None:
        counts = self._counts
        me = self._me
        with self._lock:
            if counts[0] < self.limit and counts[1] == counts[2]:  # a free slot, and nobody waits for one
                counts[0] += 1
                counts[me + _HELD] += 1
                self.in_use += 1
                return
            if self.max_queue is not None and counts[1] >= self.max_queue:
                raise QueueFull(f"all {self.limit} slots are busy and {counts[1]} requests already wait")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            arrival = time.monotonic_ns()
            if not self._waiters:
                counts[me + _OLDEST] = arrival
            self._waiters.append((waiter, arrival))
            counts[1] += 1
            counts[me + _WAITING] += 1
            self.waiting += 1
        try:
            await asyncio.wait_for(waiter, timeout)
        except BaseException as exc:
            with self._lock:
                self._deliver()  # grants that came in meanwhile go to the waiters in order (a cancelled one passes its on)
                if waiter.done() and not waiter.cancelled():  # a slot reached us as we gave up: pass it on
                    self._release()
                else:
                    self._leave(waiter)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"all {self.limit} slots stayed busy for the pool timeout") from None
            raise

    def release(self) -> None:
        with self._lock:
            self._release()

    def occupancy(self) -> int:
        """Slots taken and requests waiting, all workers together (read without the lock: a hint)."""
        return int(self._counts[0] + self._counts[1])

    def try_acquire(self) -> bool:
        counts = self._counts
        with self._lock:
            if counts[0] < self.limit and counts[1] == counts[2]:
                counts[0] += 1
                counts[self._me + _HELD] += 1
                self.in_use += 1
                return True
        return False

    def wake(self) -> None:
        """The wake-up pipe said another worker granted us slots: hand them to our waiters."""
        with self._lock:
            self._deliver()

    # --- with the lock held -------------------------------------------------------------------

    def _release(self) -> None:
        counts = self._counts
        counts[self._me + _HELD] -= 1
        self.in_use -= 1
        if counts[1] == counts[2]:  # nobody waits without a grant on its way: the slot is free
            counts[0] -= 1
            return
        chosen = _pass_on(counts)
        if chosen == self._me:
            self._deliver()
        elif chosen >= 0:
            self._table.wake_up((chosen - _HEAD) // _PER_WORKER)

    def _deliver(self) -> None:
        counts = self._counts
        me = self._me
        while counts[me + _GRANTED] > 0 and self._waiters:
            waiter, _ = self._waiters.popleft()
            counts[me + _GRANTED] -= 1
            counts[2] -= 1
            counts[me + _WAITING] -= 1
            counts[1] -= 1
            counts[me + _HELD] += 1
            self.waiting -= 1
            self.in_use += 1
            if waiter.done():  # given up, and not yet out of the queue: the slot goes on
                self._release()
            else:
                waiter.set_result(None)
        counts[me + _OLDEST] = self._waiters[0][1] if self._waiters else 0

    def _leave(self, waiter: asyncio.Future[None]) -> None:
        counts = self._counts
        for index, (queued, _) in enumerate(self._waiters):
            if queued is waiter:
                del self._waiters[index]
                counts[self._me + _WAITING] -= 1
                counts[1] -= 1
                self.waiting -= 1
                break
        counts[self._me + _OLDEST] = self._waiters[0][1] if self._waiters else 0


# --- one worker's view ----------------------------------------------------------------------------


class WorkerSlots:
    """A forked worker's counters in the shared table: what it passes to its backends' pools
    (`counter`), and the wake-up pipe its event loop reads (`listen`)."""

    def __init__(self, table: Table, worker: int) -> None:
        self._table = table
        self._worker = worker
        self._slots: dict[str, SharedSlots] = {}

    def counter(self, name: str, limit: int, max_queue: int | None) -> SharedSlots:
        """The backend's shared slots in this worker: one object for every policy generation, its
        limits the latest catalog's."""
        found = self._slots.get(name)
        if found is None:
            found = self._slots[name] = SharedSlots(self._table, self._worker, name, limit, max_queue)
        else:
            found.limit, found.max_queue = limit, max_queue
        return found

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read this worker's wake-up pipe on its event loop."""
        read_end = self._table.pipes[self._worker][0]

        def woken() -> None:
            _drain(read_end)
            for slots in list(self._slots.values()):
                slots.wake()

        loop.add_reader(read_end, woken)

    def stop_listening(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._table.pipes[self._worker][0])
