"""NATS work of a stopping process, under one short shared deadline that never blocks local clean-up.

A node that shuts down stops NATS and the services at the same time. Every NATS operation of a
drain (a micro service's stop drains each endpoint's subscription with a 10 s flush, `nc.drain()`
flushes again) would then wait for a server that is gone, one timeout after another, and the
process would overrun its stop deadline while its local resources (a sidecar's /dev/shm arena,
child process groups) were still held. Instead, each such operation runs as a `step` of the
process's `NatsStopBudget`: all steps together get `NATS_STOP_BUDGET_S` (time spent in local drains does not count), the first failure or
timeout is logged once at WARNING (without a traceback, it is an expected outage) and every later
step is skipped. The stop then finishes its local work and the process exits 0: the stop was
requested, and what NATS missed (unsubscribes, a final flush) the server forgets with the
connection anyway.

`cornserve.runtime.service` opens one budget per stop (`stopping`); code that stops NATS parts calls
`nats_step`, which uses that budget, or a fresh one outside a runtime-driven stop (tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from nats.aio.client import Client

logger = logging.getLogger(__name__)

NATS_STOP_BUDGET_S = 2.0
"""Seconds all NATS work of one stop may take together (a reachable server answers in milliseconds)."""
NATS_CLOSE_S = 1.0
"""Seconds closing the socket may take once the budget is spent (no round trip, only local work)."""


class NatsStopBudget:
    """The NATS steps of one stop: a shared deadline; after the first failure the rest are skipped."""

    def __init__(self, name: str, budget_s: float = NATS_STOP_BUDGET_S) -> None:
        self.name = name
        self.budget_s = budget_s
        self.left_s = budget_s
        """What the steps have not used yet (only time spent in NATS steps counts, not local drains)."""
        self.failed: str | None = None
        """What failed first (None while NATS answered every step)."""

    def _fail(self, what: str, reason: str) -> None:
        if self.failed is None:
            self.failed = what
            logger.warning(
                "%s: NATS unavailable while stopping (%s: %s); skipping the remaining NATS clean-up, "
                "local clean-up continues",
                self.name,
                what,
                reason,
            )

    async def step(self, what: str, work: Callable[[], Awaitable[object]]) -> bool:
        """Run `work()` within what is left of the budget; False (logged once) when it failed or was skipped."""
        if self.failed is not None:
            return False
        if self.left_s <= 0:
            self._fail(what, f"no time left of the {self.budget_s:g} s budget")
            return False
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.left_s):
                await work()
        except TimeoutError:
            self._fail(what, f"no answer within the {self.budget_s:g} s budget")
            return False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this stop itself is cancelled
            # nats-py cancels its own waiters when the connection drops mid-drain: a lost server too
            self._fail(what, "cancelled by the connection dropping")
            return False
        except Exception as exc:  # nats-py raises plain and typed errors alike for a lost server
            self._fail(what, f"{type(exc).__name__}: {exc}")
            return False
        finally:
            self.left_s -= loop.time() - started
        return True

    async def close(self, nc: Client) -> None:
        """Drain `nc` within the budget (flushes what was published); else close it without waiting."""
        if nc.is_closed:
            return
        if not nc.is_connected:
            self._fail("draining the connection", "not connected")
        elif await self.step("draining the connection", nc.drain):
            return
        try:
            async with asyncio.timeout(NATS_CLOSE_S):
                await nc.close()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            logger.debug("%s: closing the NATS connection was cancelled by nats-py", self.name)
        except Exception as exc:  # a lost server's socket often fails to close; already said above
            level = logging.DEBUG if self.failed is not None else logging.WARNING
            logger.log(
                level, "%s: closing the NATS connection failed (%s: %s)", self.name, type(exc).__name__, exc
            )


_budget: ContextVar[NatsStopBudget | None] = ContextVar("cornserve_nats_stop_budget", default=None)


@contextmanager
def stopping(name: str, budget_s: float = NATS_STOP_BUDGET_S) -> Iterator[NatsStopBudget]:
    """The budget every `nats_step` of this task (and tasks it starts) shares while the block runs."""
    budget = NatsStopBudget(name, budget_s)
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def current_budget(name: str = "cornserve") -> NatsStopBudget:
    """The running stop's budget, or a fresh one (for a stop not driven by the runtime)."""
    return _budget.get() or NatsStopBudget(name)


async def nats_step(what: str, work: Callable[[], Awaitable[object]]) -> bool:
    """`work()` as one step of the running stop's NATS budget; False when NATS failed or was skipped."""
    return await current_budget().step(what, work)
