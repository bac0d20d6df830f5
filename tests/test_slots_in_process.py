"""The slot table `serve --workers N` counts a backend's limits in (slots.py), driven in one process:
each SharedSlots below stands for one worker, its wake-up pipe read on the test's event loop as the
worker's own loop reads it. The end-to-end check with real workers is in test_workers.py."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from dreamseed.slots import SharedSlots, Table
from dreamseed.transport import QueueFull


@pytest.fixture
def table() -> Iterator[Table]:
    found = Table(3)
    yield found
    for read_end, write_end in found.pipes:
        os.close(read_end)
        os.close(write_end)


def workers(table: Table, limit: int, max_queue: int | None = None) -> list[SharedSlots]:
    """One backend's slots as each of the table's workers sees them, wake-ups read on this loop."""
    loop = asyncio.get_running_loop()
    found = [SharedSlots(table, index, "general", limit, max_queue) for index in range(table.workers)]
    for slots, (read_end, _) in zip(found, table.pipes, strict=True):
        loop.add_reader(read_end, lambda s=slots, fd=read_end: (_read(fd), s.wake()))
    return found


def in_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (pytest sees the same fixtures)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))  # type: ignore[arg-type]
    return run


def _read(fd: int) -> None:
    try:
        os.read(fd, 4096)
    except BlockingIOError:
        pass


def totals(table: Table) -> tuple[int, int, int]:
    with table.lock:
        counts = table.counters("general")
        return counts[0], counts[1], counts[2]


@in_loop
async def test_the_limit_and_the_queue_hold_for_the_backend_not_for_each_worker(table: Table) -> None:
    a, b, c = workers(table, limit=2, max_queue=2)
    await a.acquire(1)
    await b.acquire(1)
    queued = [asyncio.create_task(c.acquire(5)), asyncio.create_task(a.acquire(5))]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in queued)
    with pytest.raises(QueueFull):  # 2 taken, 2 waiting: the third worker's request is refused at once
        await b.acquire(1)
    assert totals(table) == (2, 2, 0)
    b.release()  # b's slot goes to c's waiter (the older), across processes
    await asyncio.wait_for(queued[0], 1)
    assert not queued[1].done()
    a.release()
    await asyncio.wait_for(queued[1], 1)
    for slots in (a, c):
        slots.release()
    assert totals(table) == (0, 0, 0)
    assert [s.in_use for s in (a, b, c)] == [0, 0, 0] and [s.waiting for s in (a, b, c)] == [0, 0, 0]


@in_loop
async def test_a_freed_slot_goes_to_the_oldest_waiter_whichever_worker_holds_it(table: Table) -> None:
    a, b, c = workers(table, limit=1)
    await a.acquire(1)
    order: list[str] = []

    async def wait(slots: SharedSlots, name: str) -> None:
        await slots.acquire(5)
        order.append(name)

    tasks = []
    for slots, name in ((b, "b1"), (a, "a1"), (c, "c1"), (b, "b2"), (a, "a2")):
        tasks.append(asyncio.create_task(wait(slots, name)))
        await asyncio.sleep(0.002)  # arrival order
    holder = a
    for served, expected in enumerate(("b1", "a1", "c1", "b2", "a2")):
        holder.release()
        for _ in range(1000):
            if len(order) > served:
                break
            await asyncio.sleep(0.001)
        assert order == [*order[:served], expected]
        holder = {"a": a, "b": b, "c": c}[expected[0]]
    holder.release()
    assert totals(table) == (0, 0, 0)


@in_loop
async def test_a_waiter_that_gives_up_leaves_the_counts_right_even_with_a_grant_on_its_way(table: Table) -> None:
    a, b, _ = workers(table, limit=1)
    await a.acquire(1)
    with pytest.raises(httpx.PoolTimeout):  # times out: no longer counted as waiting
        await b.acquire(0.05)
    assert totals(table) == (1, 0, 0)
    # A grant sent to b's waiter while b's loop has not read its pipe yet, and the waiter is cancelled:
    # the slot must pass on to the next waiter (a's), not vanish with the cancelled one.
    giving_up = asyncio.create_task(b.acquire(5))
    await asyncio.sleep(0.002)
    next_in_line = asyncio.create_task(a.acquire(5))
    await asyncio.sleep(0.002)
    a.release()  # granted to b (oldest); its wake-up byte is in the pipe, not read yet
    giving_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await giving_up
    await asyncio.wait_for(next_in_line, 1)
    a.release()
    assert totals(table) == (0, 0, 0)


@in_loop
async def test_a_dead_workers_slots_are_freed_for_the_others(table: Table) -> None:
    a, b, _ = workers(table, limit=2)
    await b.acquire(1)
    await b.acquire(1)
    waiting = asyncio.create_task(a.acquire(5))
    await asyncio.sleep(0.01)
    table.forget(1)  # worker b died with both slots: one goes to a's waiter, the other is free
    await asyncio.wait_for(waiting, 1)
    assert totals(table) == (1, 0, 0)
    await a.acquire(1)
    assert totals(table) == (2, 0, 0) and a.in_use == 2


def test_a_worker_killed_while_holding_the_lock_does_not_stop_the_others(table: Table) -> None:
    pid = os.fork()
    if pid == 0:  # a worker that takes the lock and dies with it (SIGKILL inside an update)
        table.lock.acquire()
        os._exit(0)
    os.waitpid(pid, 0)
    table.forget(1)  # what the parent does before replacing it: must not hang
    assert table.lock.acquire(timeout=1.0)
    table.lock.release()


@in_loop
async def test_backends_are_told_apart_by_their_whole_names(table: Table) -> None:
    prefix = "백엔드-" * 30  # far longer than any fixed-size name field
    first = SharedSlots(table, 0, prefix + "a", 1, 0)
    second = SharedSlots(table, 0, prefix + "b", 1, 0)
    await first.acquire(1)
    await second.acquire(1)  # its own slot, not first's
    with pytest.raises(QueueFull):
        await first.acquire(1)


@in_loop
async def test_every_worker_sees_the_backends_occupancy_for_balancing(table: Table) -> None:
    """Balancing (balancing.py) ranks replicas by occupancy: a worker must see the slots the others
    hold and wait for, or it sends requests to a replica the other workers have filled."""
    first, second, third = workers(table, limit=2)
    await first.acquire(1)
    await second.acquire(1)
    waiting = asyncio.ensure_future(third.acquire(5))
    await asyncio.sleep(0.01)
    assert [w.occupancy() for w in (first, second, third)] == [3, 3, 3]
    assert (third.in_use, third.waiting) == (0, 1)  # its own view alone would say one
    first.release()
    await waiting
    third.release()
    second.release()
    assert [w.occupancy() for w in (first, second, third)] == [0, 0, 0]
