"""`read_on_loop`: a collector's read of loop state runs on the loop, whichever thread scrapes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cornserve.runtime.metrics import read_on_loop


async def test_a_read_from_another_thread_runs_on_the_loop_thread() -> None:
    loop_thread = threading.get_ident()
    read = read_on_loop(threading.get_ident)
    seen = await asyncio.to_thread(read)
    assert seen == loop_thread
    assert read() == loop_thread  # on the loop itself: called directly


async def test_a_read_sees_the_state_as_the_loop_left_it() -> None:
    state: dict[int, int] = {}
    read = read_on_loop(lambda: dict(state))

    async def mutate() -> None:
        for i in range(2000):
            state[i] = i
            if i % 50 == 0:
                await asyncio.sleep(0)

    writer = asyncio.create_task(mutate())
    snapshots = [await asyncio.to_thread(read) for _ in range(20)]
    await writer
    assert all(set(snap) == set(range(len(snap))) for snap in snapshots)
    assert await asyncio.to_thread(read) == {i: i for i in range(2000)}


async def test_a_blocked_loop_fails_the_read_with_a_timeout() -> None:
    read = read_on_loop(lambda: 1, timeout_s=0.2)
    outcome: list[BaseException | int] = []

    def scrape() -> None:
        try:
            outcome.append(read())
        except TimeoutError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=scrape)
    thread.start()
    time.sleep(0.5)  # blocks the loop: the read cannot run
    thread.join(timeout=5)
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)
    await asyncio.sleep(0)  # the cancelled read, now run, does nothing


async def test_an_error_of_the_source_reaches_the_scrape_thread() -> None:
    def broken() -> int:
        raise KeyError("gone")

    with pytest.raises(KeyError):
        await asyncio.to_thread(read_on_loop(broken))


class _LoopOnlyDict(dict[str, object]):
    """A dict that records which thread iterates it (loop state must be read on the loop)."""

    readers: set[int]

    def values(self):  # type: ignore[override]
        self.readers.add(threading.get_ident())
        return super().values()


async def test_the_task_managers_collector_reads_its_executors_on_the_loop() -> None:
    from types import SimpleNamespace

    from cornserve.task_manager import metrics

    executors = _LoopOnlyDict(
        a=SimpleNamespace(executor_id="a", state="ready", in_flight=2, routed=5, restarts=1)
    )
    executors.readers = set()
    # in_flight: the manager's own count plus what dispatchers routed from its table (here: 3).
    manager = SimpleNamespace(
        task_key="k", task=SimpleNamespace(), executors=executors, in_flight=lambda ex: ex.in_flight + 1
    )
    metrics.watch_manager(manager)  # type: ignore[arg-type]
    try:
        families = await asyncio.to_thread(lambda: list(metrics.EXECUTORS.collect()))
    finally:
        metrics.EXECUTORS.source = None
    assert executors.readers == {threading.get_ident()}  # the loop's thread, not the scrape thread
    samples = {(s.name, tuple(s.labels.values())): s.value for f in families for s in f.samples}
    assert samples[("cornserve_task_executors", ("k", "SimpleNamespace", "ready"))] == 1
    assert samples[("cornserve_task_executor_in_flight", ("k", "SimpleNamespace", "a"))] == 3
    assert samples[("cornserve_task_executor_restarts_total", ("k", "SimpleNamespace", "a"))] == 1
