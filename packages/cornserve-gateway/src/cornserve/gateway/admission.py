"""Admission control of app invocations: a bounded number running, a bounded queue, 429 beyond.

Without a bound, every request the gateway accepts runs at once: under overload, app drivers,
graphs, executor queues and the gateway's memory all grow, and every request's latency grows with
them until it hits the deadlines. So each app has a limit of invocations running at once
(`--app-max-concurrency`, streams count until they end) and a FIFO queue of at most
`--app-max-queue` invocations waiting for a slot. A request that finds both full is refused at once
with `429 overloaded` and `Retry-After`: the caller backs off instead of piling on, and the
requests already admitted keep their latency. An app that declares `max_concurrency = 0` in its
`AppConfig` has no capacity at all: `503 no_capacity`.

The check happens before the request body is read, so a refused request costs the gateway a few
hundred bytes and no app code runs. A queued request whose client hangs up leaves the queue at
once (its connection is watched as a running invocation's is). A queued request's wait counts against its request deadline
(`--request-timeout`): if no slot frees up in time, it is `504 request_timeout` like any other
invocation that runs out of time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from cornserve.app import AppConfig
from cornserve.gateway.disconnect import cancel_on_disconnect
from cornserve.gateway.errors import HTTPError
from cornserve.gateway.metrics import APP_NAME_KEY

ARRIVED_KEY = web.RequestKey("cornserve_arrived", float)
"""When the request arrived (event-loop time): its deadline counts from here, queueing included."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AdmissionLimits:
    """The gateway's defaults (`--app-max-concurrency`, `--app-max-queue`, `--app-retry-after`)."""

    max_concurrency: int = 64
    max_queue: int = 64
    retry_after_s: float = 1.0


def app_limits(config: type[AppConfig], defaults: AdmissionLimits) -> tuple[int, int]:
    """(max concurrency, max queue) of an app: its `AppConfig` overrides, else the gateway's defaults."""
    concurrency = config.max_concurrency
    queue = config.max_queue
    return (
        defaults.max_concurrency if concurrency is None else concurrency,
        defaults.max_queue if queue is None else queue,
    )


@dataclass(eq=False)
class AppGate:
    """The running count and wait queue of one app."""

    name: str
    max_concurrency: int
    max_queue: int
    retry_after_s: float
    running: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def _refuse(self) -> HTTPError:
        if self.max_concurrency == 0:
            return HTTPError(
                503,
                "no_capacity",
                f"app {self.name!r} has no capacity: its AppConfig sets max_concurrency = 0",
            )
        return HTTPError(
            429,
            "overloaded",
            f"app {self.name!r} is at capacity: {self.running} invocation(s) running (limit "
            f"{self.max_concurrency}) and {len(self.waiters)} waiting (limit {self.max_queue}; the gateway's "
            "--app-max-concurrency/--app-max-queue or the app's AppConfig); retry after the Retry-After "
            "header's seconds",
            headers={"Retry-After": str(max(1, math.ceil(self.retry_after_s)))},
        )

    def try_acquire(self) -> bool:
        """Take a running slot if one is free now (no waiting): what `acquire` does first."""
        if self.running < self.max_concurrency and not self.waiters:
            self.running += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take one running slot: at once, after queueing for one, or raise 429/503 at once.

        Every successful `acquire` must be paired with one `release`.
        """
        if self.try_acquire():
            return
        if self.max_concurrency == 0 or len(self.waiters) >= self.max_queue:
            raise self._refuse()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter  # `release` hands its slot over (running stays counted)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the first waiter still waiting, else to the pool."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the next waiter: running is unchanged
                return
        self.running -= 1


class Admission:
    """Per-app gates, created on an app's first invocation and rebuilt when it is re-registered."""

    def __init__(self, defaults: AdmissionLimits, request_timeout_s: float) -> None:
        self.defaults = defaults
        self.request_timeout_s = request_timeout_s
        self._gates: dict[str, tuple[type[AppConfig], AppGate]] = {}

    def gate(self, name: str, config: type[AppConfig]) -> AppGate:
        """The gate of app `name` as registered with `config` (a new registration gets a new gate)."""
        known = self._gates.get(name)
        if known is not None and known[0] is config:
            return known[1]
        concurrency, queue = app_limits(config, self.defaults)
        gate = AppGate(name, concurrency, queue, self.defaults.retry_after_s)
        self._gates[name] = (config, gate)
        return gate

    def counts(self, name: str) -> dict[str, int]:
        """Running and waiting invocations of app `name` (GET /apps/{name} shows them; 0 before any)."""
        known = self._gates.get(name)
        gate = known[1] if known is not None else None
        return (
            {"running": gate.running, "waiting": len(gate.waiters)} if gate else {"running": 0, "waiting": 0}
        )

    def stats(self) -> dict[str, dict[str, int]]:
        """Running and waiting invocations per app (for logs and tests)."""
        return {
            name: {"running": g.running, "waiting": len(g.waiters)} for name, (_, g) in self._gates.items()
        }

    async def run(
        self,
        request: web.Request,
        resolve: Callable[[web.Request], type[AppConfig] | None],
        handler: Handler,
    ) -> web.StreamResponse:
        """Run `handler` holding a slot of the app's gate; `resolve` names the app's config.

        `resolve` raises for an unknown app (404) and returns None for one that is not ready (the
        handler answers 409), so neither takes a slot. The slot is held until the handler returns,
        which for a stream is when the stream has ended. A client that hangs up while queued leaves
        the queue at once (`cancel_on_disconnect`), so a dead request never takes a slot and the
        next one can queue in its place.
        """
        request[ARRIVED_KEY] = asyncio.get_running_loop().time()
        config = resolve(request)
        if config is None:
            return await handler(request)
        async with self.slot(request, request.match_info["name"], config):
            return await handler(request)

    @contextlib.asynccontextmanager
    async def slot(self, request: web.Request, name: str, config: type[AppConfig]) -> AsyncIterator[None]:
        """Hold one running slot of app `name`'s gate (429/503 at once when full; 504 past the deadline).

        While queued, `request`'s client hanging up leaves the queue at once (`cancel_on_disconnect`).

        For a route that learns the app from the body (`/v1/chat/completions`, `model`): it calls
        this once it knows the app, after setting the request's `ARRIVED_KEY`.
        """
        request[APP_NAME_KEY] = name  # from here on the request counts in the app's metrics
        gate = self.gate(name, config)
        if not gate.try_acquire():  # a free slot is taken at once, without a watcher task or a deadline
            limit = asyncio.timeout(self.request_timeout_s)
            try:
                async with cancel_on_disconnect(request), limit:
                    await gate.acquire()
            except TimeoutError:
                if limit.expired():
                    raise HTTPError(
                        504,
                        "request_timeout",
                        f"app {name!r} had no free slot within the request deadline of "
                        f"{self.request_timeout_s:g} s (the gateway's --request-timeout)",
                    ) from None
                raise
        try:
            yield
        finally:
            gate.release()
