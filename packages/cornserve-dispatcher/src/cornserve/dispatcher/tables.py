"""Executor tables pushed by task managers: route an invocation here, without a round trip.

Each task manager publishes the ready executors of its task (`ExecutorTable` on
`cornserve.tm.<key>.table`) on every change and every interval. A replica keeps the latest table
of every key and picks the executor with the fewest invocations it has outstanding there (ties:
fewest routed), instead of a `route` request and a `RouteDone` per invocation. Task managers still
own health and drain: a draining or unhealthy executor leaves the table. What the replica has
outstanding goes back to each task manager as `ExecutorUsage` (on each new table version, the
acknowledgement a drain waits for; coalesced on changes; and every interval), which keeps the task
manager's in-flight counts, drain and scale-down correct.

No table, an empty one (no ready executor: `route` answers why), one older than its stale window
(its task manager may be gone) or one dropped after an executor refused a connection: the caller
asks `route` as before (`GraphRunner`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cornserve.bus.control import TM_PREFIX, ExecutorTable, ExecutorUsage, RouteReply, tm_subject
from cornserve.bus.events import parse_event

logger = logging.getLogger(__name__)

TABLES_SUBJECT = f"{TM_PREFIX}.*.table"
"""Every task manager's table."""

COALESCE_S = 0.02
"""A change of outstanding invocations is reported at most this long after it (one message for many)."""

REPORT_INTERVAL_S = 1.0
"""Usage reports are repeated this often while a table is held (the task manager's liveness view)."""


@dataclass
class _Table:
    table: ExecutorTable
    received: float
    outstanding: dict[str, int] = field(default_factory=dict)
    routed: dict[str, int] = field(default_factory=dict)
    routed_changed: set[str] = field(default_factory=set)
    """Executors whose `routed` count changed since the last report (a change report carries only these)."""
    dropped: bool = False
    """An executor of this version refused a connection: ask `route` until a new version comes."""

    def fresh(self, now: float) -> bool:
        return (
            not self.dropped and now - self.received <= ExecutorTable.STALE_INTERVALS * self.table.interval_s
        )


@dataclass(eq=False)
class ExecutorTables:
    """The latest table of every task key, and this replica's outstanding invocations on each."""

    nc: Client
    replica_id: str
    report_interval_s: float = REPORT_INTERVAL_S
    _tables: dict[str, _Table] = field(default_factory=dict, init=False)
    _dirty: set[str] = field(default_factory=set, init=False)
    _flush: asyncio.TimerHandle | None = field(default=None, init=False)
    _sub: Subscription | None = field(default=None, init=False)
    _heartbeat: asyncio.Task[None] | None = field(default=None, init=False)
    _sending: set[asyncio.Task[None]] = field(default_factory=set, init=False)

    async def start(self) -> None:
        """Subscribe to every task manager's table and start the periodic reports."""
        self._sub = await self.nc.subscribe(TABLES_SUBJECT, cb=self._on_table)
        self._heartbeat = asyncio.create_task(self._report_periodically(), name="usage-reports")

    async def stop(self) -> None:
        """Stop following tables and reporting."""
        if self._flush is not None:
            self._flush.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # a closed connection: nothing left to unsubscribe from
                logger.debug("unsubscribing from tables: %s", exc)
        await asyncio.gather(*self._sending, return_exceptions=True)

    # ----- routing ---------------------------------------------------------------------------------

    def pick(self, task_key: str) -> RouteReply | None:
        """An executor of `task_key` from a fresh table (counted outstanding), or None: ask `route`."""
        held = self._tables.get(task_key)
        if held is None or not held.table.executors or not held.fresh(time.monotonic()):
            return None
        entry = min(
            held.table.executors,
            key=lambda e: (held.outstanding.get(e.executor_id, 0), held.routed.get(e.executor_id, 0)),
        )
        held.outstanding[entry.executor_id] = held.outstanding.get(entry.executor_id, 0) + 1
        held.routed[entry.executor_id] = held.routed.get(entry.executor_id, 0) + 1
        held.routed_changed.add(entry.executor_id)
        self._changed(task_key)
        return RouteReply(
            request_id="",
            executor_id=entry.executor_id,
            url=entry.url,
            sidecar_ranks=entry.sidecar_ranks,
            channel=entry.channel,
        )

    def done(self, task_key: str, executor_id: str) -> None:
        """An invocation picked by `pick` finished."""
        held = self._tables.get(task_key)
        if held is None:
            return
        left = held.outstanding.get(executor_id, 0) - 1
        if left > 0:
            held.outstanding[executor_id] = left
        else:
            held.outstanding.pop(executor_id, None)
        self._changed(task_key)

    def drop(self, task_key: str, executor_id: str) -> None:
        """`executor_id` refused a connection: route `task_key` through its task manager until its table changes."""
        held = self._tables.get(task_key)
        if held is not None and not held.dropped:
            held.dropped = True
            logger.info(
                "executor %s of %s refused a connection; asking its task manager until its table changes",
                executor_id,
                task_key,
            )

    # ----- tables in, usage out --------------------------------------------------------------------

    async def _on_table(self, msg: Msg) -> None:
        table = parse_event(ExecutorTable, msg, logger)
        if table is None:
            return
        if msg.subject != tm_subject(table.task_key, "table"):
            logger.warning("ExecutorTable of %s arrived on %s; ignored", table.task_key, msg.subject)
            return
        now = time.monotonic()
        held = self._tables.get(table.task_key)
        if held is not None and held.table.instance == table.instance and held.table.version == table.version:
            held.received = now  # the periodic copy: still current (a dropped one stays dropped)
            return
        if held is not None and held.table.instance == table.instance and table.version < held.table.version:
            return  # an older copy overtaken by a newer one
        kept = held.outstanding if held is not None else {}
        routed = held.routed if held is not None else {}
        self._tables[table.task_key] = _Table(table, now, kept, routed)
        self._send(table.task_key, every_count=True)  # the acknowledgement of this version, at once

    def _changed(self, task_key: str) -> None:
        self._dirty.add(task_key)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(COALESCE_S, self._flush_dirty)

    def _flush_dirty(self) -> None:
        self._flush = None
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            self._send(key)

    def _send(self, task_key: str, every_count: bool = False) -> None:
        """Report usage; the `routed` counts of every executor (`every_count`) or of those that changed.

        The counts are cumulative, so the task manager adds what is new whichever report it gets. A
        change report (coalesced, the hot path) carries only the counts that changed since the last
        report; the acknowledgement and the periodic report carry them all, which repairs a lost
        report (core NATS delivers at most once, and nothing acknowledges a usage report) and
        teaches a restarted task manager every count within one interval. Deltas would not: a lost
        one would be lost for good.
        """
        held = self._tables.get(task_key)
        if held is None:
            return
        if every_count:
            routed = dict(held.routed)
        else:
            routed = {e: held.routed[e] for e in held.routed_changed if e in held.routed}
        held.routed_changed.clear()
        usage = ExecutorUsage(
            replica_id=self.replica_id,
            instance=held.table.instance,
            version=held.table.version,
            outstanding=dict(held.outstanding),
            routed=routed,
            interval_s=self.report_interval_s,
        )
        task = asyncio.ensure_future(
            self.nc.publish(tm_subject(task_key, "usage"), usage.model_dump_json().encode())
        )
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("a usage report was not sent: %s", task.exception())

    async def _report_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval_s)
            now = time.monotonic()
            for key, held in list(self._tables.items()):
                if (
                    now - held.received > 10 * ExecutorTable.STALE_INTERVALS * held.table.interval_s
                    and not held.outstanding
                ):
                    del self._tables[key]  # its task manager is long gone
                    continue
                self._send(key, every_count=True)
