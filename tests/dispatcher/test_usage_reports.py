"""A replica's usage reports: change reports name only the routed counts that changed; the
acknowledgement and the periodic report name them all (which makes good a lost report).

`ExecutorTables` on a real nats-server; the test stands in for the task manager (publishes its
table, reads the usage subject) and feeds what it reads to the task manager's own `RemoteUsage`.
"""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.client import Client
from nats.aio.msg import Msg

from cornserve.bus.control import ExecutorTable, ExecutorUsage, TableEntry, tm_subject
from cornserve.dispatcher.tables import ExecutorTables
from cornserve.task_manager.usage import RemoteUsage

DEADLINE = 30.0


class TaskManagerSide:
    """Publishes one key's table and reads the replica's usage reports in order."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.key = f"usage-{uuid.uuid4().hex[:8]}"
        self.reports: asyncio.Queue[ExecutorUsage] = asyncio.Queue()

    async def start(self) -> None:
        await self.nc.subscribe(tm_subject(self.key, "usage"), cb=self._on_usage)

    async def _on_usage(self, msg: Msg) -> None:
        self.reports.put_nowait(ExecutorUsage.model_validate_json(msg.data))

    async def publish(self, version: int) -> None:
        entries = [
            TableEntry(executor_id=e, url=f"http://127.0.0.1:1/{e}", sidecar_ranks=[0]) for e in ("e0", "e1")
        ]
        table = ExecutorTable(
            task_key=self.key, instance="i1", version=version, executors=entries, interval_s=30
        )
        await self.nc.publish(tm_subject(self.key, "table"), table.model_dump_json().encode())

    async def next(self) -> ExecutorUsage:
        async with asyncio.timeout(DEADLINE):
            return await self.reports.get()


async def test_change_reports_name_only_changed_counts_and_acknowledgements_all(nc: Client) -> None:
    tm = TaskManagerSide(nc)
    await tm.start()
    tables = ExecutorTables(nc, "r1", report_interval_s=60)  # no periodic report during the test
    await tables.start()
    try:
        await tm.publish(1)
        assert (await tm.next()).routed == {}  # the acknowledgement: nothing routed yet
        first, second = tables.pick(tm.key), tables.pick(tm.key)
        assert first is not None and second is not None
        assert {first.executor_id, second.executor_id} == {"e0", "e1"}
        change = await tm.next()  # the two picks, coalesced into one report
        assert (change.routed, change.outstanding) == ({"e0": 1, "e1": 1}, {"e0": 1, "e1": 1})
        tables.done(tm.key, "e0")
        change = await tm.next()  # only the outstanding count changed: no routed count named
        assert (change.routed, change.outstanding) == ({}, {"e1": 1})
        again = tables.pick(tm.key)
        assert again is not None and again.executor_id == "e0"
        change = await tm.next()
        assert (change.routed, change.outstanding) == ({"e0": 2}, {"e0": 1, "e1": 1})
        # A task manager that lost every change report (or restarted) learns all the counts from the
        # next acknowledgement, as from the periodic report.
        await tm.publish(2)
        ack = await tm.next()
        assert ack.version == 2 and ack.routed == {"e0": 2, "e1": 1}
        assert RemoteUsage().record(ack) == {"e0": 2, "e1": 1}
    finally:
        await tables.stop()


async def test_the_periodic_report_names_every_count(nc: Client) -> None:
    tm = TaskManagerSide(nc)
    await tm.start()
    tables = ExecutorTables(nc, "r1", report_interval_s=0.2)
    await tables.start()
    try:
        await tm.publish(1)
        await tm.next()  # the acknowledgement: the replica holds the table
        picked = tables.pick(tm.key)
        assert picked is not None
        tables.done(tm.key, picked.executor_id)
        # After the change reports, the periodic ones repeat the count though it did not change.
        async with asyncio.timeout(DEADLINE):
            while True:
                report = await tm.next()
                if report.outstanding == {} and report.routed == {picked.executor_id: 1}:
                    break
        report = await tm.next()  # and the next one again
        assert report.routed == {picked.executor_id: 1}
    finally:
        await tables.stop()
