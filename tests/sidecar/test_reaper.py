"""The TTL reaper keeps reclaiming memory whatever one of its sweeps throws (the real `Reaper` class)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from tests.support.waiting import wait_for

from cornserve.sidecar.allocation import Reservation
from cornserve.sidecar.holdings import Held
from cornserve.sidecar.server import SidecarServer


async def test_reaper_survives_a_failing_sweep_and_still_frees_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Not started: the reaper only needs the bookkeeping (allocator, holdings), no arena or NATS.
    server = SidecarServer(
        rank=0,
        node="reaper-test",
        nats_url="nats://unused",
        arena_bytes=1 << 20,
        ttl_s=0.05,
        tcp_host="127.0.0.1",
    )
    memory = server.memory
    # An entry whose free raises (no such block): the injected fault.
    memory.unsent[1 << 30] = Reservation(1 << 30, 4096, created=0.0)
    good_unsent = memory.alloc.alloc(1000)
    memory.unsent[good_unsent] = Reservation(good_unsent, memory.alloc.size_of(good_unsent), created=0.0)
    server.holdings.held[("bad", 0)] = Held(offset=12345)  # free raises here too
    good_held = memory.alloc.alloc(1000)
    server.holdings.held[("good", 0)] = Held(offset=good_held)
    assert memory.alloc.used_bytes > 0

    caplog.set_level(logging.ERROR, logger="cornserve.sidecar.server")
    task = asyncio.create_task(server.reaper.run_forever())
    try:

        async def reclaimed() -> bool:
            assert not task.done(), task  # the loop must not die
            return memory.alloc.used_bytes == 0 and not memory.unsent and not server.holdings.held

        await wait_for(reclaimed, 10.0, "the reaper to free every healthy entry despite the faults")
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    failures = [r for r in caplog.records if "TTL sweep" in r.getMessage()]
    assert failures and all(r.exc_info is not None for r in failures)  # logged with the traceback
    assert {"_reap_unsent", "_reap_held"} <= {r.getMessage().split()[4] for r in failures}


def test_one_sweep_reports_its_failures_without_raising() -> None:
    server = SidecarServer(
        rank=0,
        node="reaper-test",
        nats_url="nats://unused",
        arena_bytes=1 << 20,
        ttl_s=0.05,
        tcp_host="127.0.0.1",
    )
    server.memory.unsent[1 << 30] = Reservation(1 << 30, 4096, created=0.0)
    assert server.reap() == 1
    assert server.reap() == 0  # the broken entry was dropped, not retried forever
