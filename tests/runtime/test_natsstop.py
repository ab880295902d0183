"""`NatsStopBudget`: NATS work of a stop is bounded, said once, and never blocks what follows."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.nats import connect_nats
from cornserve.runtime.natsstop import NatsStopBudget, current_budget, nats_step, stopping


async def test_a_hanging_step_costs_the_budget_once_and_later_steps_are_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    budget = NatsStopBudget("svc", budget_s=0.3)
    ran: list[str] = []

    async def hang() -> None:
        await asyncio.Event().wait()

    async def later() -> None:
        ran.append("later")

    started = time.monotonic()
    assert not await budget.step("first", hang)
    assert not await budget.step("second", later)
    assert time.monotonic() - started < 0.3 + 1.0  # the deadline check: budget + 1 s
    assert ran == [] and budget.failed == "first"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "svc: NATS unavailable while stopping (first" in warnings[0].message
    assert warnings[0].exc_info is None


async def test_steps_share_the_running_stops_budget() -> None:
    async def ok() -> None:
        return None

    with stopping("svc") as budget:
        assert current_budget() is budget
        assert await nats_step("one", ok) and budget.failed is None
    assert current_budget() is not budget


async def test_close_with_nats_gone_is_quick_and_without_error(caplog: pytest.LogCaptureFixture) -> None:
    server = NatsServerProcess()
    server.start()
    try:
        nc = await connect_nats(server.url, name="stop-test")
        sub = await nc.subscribe("t.x")
        server.kill()
        started = time.monotonic()
        with stopping("svc") as budget:
            await budget.step("unsubscribe", sub.drain)
            await budget.close(nc)
        assert time.monotonic() - started < budget.budget_s + 1.0
        assert nc.is_closed
        assert budget.failed is not None
    finally:
        server.stop()
