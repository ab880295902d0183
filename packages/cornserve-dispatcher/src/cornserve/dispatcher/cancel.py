"""Cancelling graphs whose caller gave up: `InvokeCancel` on `cornserve.dispatch.cancel`.

A gateway whose client hung up (or whose request deadline passed) publishes an `InvokeCancel`
naming the `cancel_id` it put in the graph's `InvokeRequest`. Every replica hears it (a plain
subscription, not the queue group); the one running that graph cancels its tasks: the graph run
(its executor requests are dropped, so the executors' handlers are cancelled) and the relay of its
stream (the executor's response is closed). Their own clean-up then reports every routed
invocation done to its task manager, so nothing stays counted in flight.

A cancel can overtake its graph (the two messages arrive on different subscriptions), so a cancel
that matches nothing is remembered for a while and a graph arriving with that id is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cornserve.bus.control import DISPATCH_CANCEL, InvokeCancel
from cornserve.bus.events import parse_event
from cornserve.runtime.natsstop import nats_step

logger = logging.getLogger(__name__)

OnCancel = Callable[[str], None]
"""Told the cancel's reason just before its task is cancelled (e.g. so a relay says why it ended)."""


@dataclass(eq=False)
class CancelBoard:
    """The tasks of each cancellable graph this replica runs, by cancel id."""

    nc: Client
    remember_s: float = 60.0
    """How long a cancel that matched no running graph is kept (for a graph arriving after it)."""
    max_remembered: int = 4096
    cancelled: int = field(default=0, init=False)
    """Graphs (or streams) cancelled by their caller since start (shown in the micro stats)."""
    _running: dict[str, dict[asyncio.Task[None], OnCancel | None]] = field(default_factory=dict, init=False)
    _early: OrderedDict[str, float] = field(default_factory=OrderedDict, init=False)
    _sub: Subscription | None = field(default=None, init=False)

    async def start(self) -> None:
        """Subscribe to cancels (every replica: the one running the graph acts)."""
        self._sub = await self.nc.subscribe(DISPATCH_CANCEL, cb=self._on_message)

    async def stop(self) -> None:
        """Unsubscribe (bounded by the stop's NATS budget)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await nats_step("unsubscribing from cancels", sub.unsubscribe)

    def was_cancelled(self, cancel_id: str | None) -> bool:
        """Whether a cancel for this id already arrived (the graph must not run)."""
        if cancel_id is None:
            return False
        self._prune()
        return cancel_id in self._early

    def track(
        self, cancel_id: str | None, task: asyncio.Task[None], on_cancel: OnCancel | None = None
    ) -> None:
        """Make `task` cancellable under `cancel_id` until it finishes (no id: not cancellable)."""
        if cancel_id is None:
            return
        if self.was_cancelled(cancel_id):  # the cancel came while the graph was being set up
            if on_cancel is not None:
                on_cancel("the caller gave up")
            task.cancel("cancelled by the caller")
            return
        tasks = self._running.setdefault(cancel_id, {})
        tasks[task] = on_cancel

        def finished(done: asyncio.Task[None]) -> None:
            left = self._running.get(cancel_id)
            if left is not None:
                left.pop(done, None)
                if not left:
                    del self._running[cancel_id]

        task.add_done_callback(finished)

    def cancel(self, request: InvokeCancel) -> int:
        """Cancel the graph's running tasks; how many were cancelled (0: remembered for later)."""
        tasks = self._running.pop(request.cancel_id, None)
        if not tasks:
            self._remember(request.cancel_id)
            return 0
        reason = request.reason or "the caller gave up"
        for task, on_cancel in tasks.items():
            if task.done():
                continue
            if on_cancel is not None:
                on_cancel(reason)
            task.cancel(f"cancelled by the caller: {reason}")
        self.cancelled += 1
        logger.info("graph %s cancelled by its caller: %s", request.request_id or request.cancel_id, reason)
        return len(tasks)

    async def _on_message(self, msg: Msg) -> None:
        request = parse_event(InvokeCancel, msg, logger)
        if request is None:
            return
        self.cancel(request)

    def _remember(self, cancel_id: str) -> None:
        self._early[cancel_id] = time.monotonic()
        self._early.move_to_end(cancel_id)
        self._prune()

    def _prune(self) -> None:
        horizon = time.monotonic() - self.remember_s
        while self._early and (
            len(self._early) > self.max_remembered or next(iter(self._early.values())) < horizon
        ):
            self._early.popitem(last=False)
