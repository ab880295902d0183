"""The gateway's per-app admission gate, in process: bounded running, bounded FIFO queue, 429/503 beyond.

The end-to-end overload check on real processes is tests/limits/test_limits.py; these pin the gate's
hand-over rules, which a whole cluster cannot reach deterministically (a waiter cancelled just as
a slot is handed to it; a re-registered app getting a fresh gate).
"""

from __future__ import annotations

import asyncio

import pytest

from cornserve.app import AppConfig
from cornserve.gateway.admission import Admission, AdmissionLimits, AppGate, app_limits
from cornserve.gateway.errors import HTTPError


def gate(concurrency: int = 2, queue: int = 1) -> AppGate:
    return AppGate("demo", concurrency, queue, retry_after_s=2.5)


async def test_beyond_running_and_queued_slots_is_429_with_retry_after() -> None:
    g = gate()
    await g.acquire()
    await g.acquire()
    queued = asyncio.create_task(g.acquire())
    await asyncio.sleep(0)
    assert (g.running, len(g.waiters)) == (2, 1)
    with pytest.raises(HTTPError) as refused:
        await g.acquire()
    assert (refused.value.status, refused.value.error) == (429, "overloaded")
    assert refused.value.headers == {"Retry-After": "3"}  # whole seconds, rounded up
    assert "--app-max-concurrency" in refused.value.message

    g.release()  # the slot goes straight to the queued request
    await asyncio.wait_for(queued, 5)
    assert (g.running, len(g.waiters)) == (2, 0)
    g.release()
    g.release()
    assert g.running == 0


async def test_the_queue_is_first_in_first_out() -> None:
    g = gate(concurrency=1, queue=3)
    await g.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await g.acquire()
        order.append(i)

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await asyncio.sleep(0)
    for _ in range(3):
        g.release()
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2]
    g.release()
    assert g.running == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_never_leaks_a_slot() -> None:
    g = gate(concurrency=1, queue=2)
    await g.acquire()
    gone = asyncio.create_task(g.acquire())
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(g.waiters) == 0

    # Cancelled in the same step its slot was handed over: the slot passes on, nothing leaks.
    late = asyncio.create_task(g.acquire())
    next_one = asyncio.create_task(g.acquire())
    await asyncio.sleep(0)
    g.release()  # hands the slot to `late`...
    late.cancel()  # ...which gives up before it runs
    with pytest.raises(asyncio.CancelledError):
        await late
    await asyncio.wait_for(next_one, 5)
    assert (g.running, len(g.waiters)) == (1, 0)
    g.release()
    assert g.running == 0


async def test_zero_concurrency_is_503_no_capacity() -> None:
    with pytest.raises(HTTPError) as refused:
        await gate(concurrency=0, queue=5).acquire()
    assert (refused.value.status, refused.value.error) == (503, "no_capacity")


def test_an_app_config_overrides_the_gateway_defaults() -> None:
    class Own(AppConfig):
        max_concurrency = 3

    class Off(AppConfig):
        max_concurrency = 0
        max_queue = 0

    defaults = AdmissionLimits(max_concurrency=8, max_queue=4)
    assert app_limits(AppConfig, defaults) == (8, 4)
    assert app_limits(Own, defaults) == (3, 4)
    assert app_limits(Off, defaults) == (0, 0)

    admission = Admission(defaults, request_timeout_s=10)
    first = admission.gate("app", Own)
    assert admission.gate("app", Own) is first
    assert admission.gate("app", Off) is not first  # re-registered with another config: a fresh gate
    assert admission.stats() == {"app": {"running": 0, "waiting": 0}}
