"""Routing from task managers' executor tables: real dispatcher processes, a table published by the test."""

from __future__ import annotations

import asyncio
import types

import pytest
from nats.aio.msg import Msg
from tests.dispatcher.support import StandInControlPlane

from cornserve.bus.control import ExecutorTable, ExecutorUsage, TableEntry, tm_subject
from cornserve.gateway.dispatch_client import DispatcherClient, DispatchError
from cornserve.runtime.process import free_port
from cornserve.task import use_graph_runner

DEADLINE = 60.0
REPLICAS = {"d1", "d2"}


class Reports:
    """Every replica's usage reports for one task key."""

    def __init__(self) -> None:
        self.latest: dict[str, ExecutorUsage] = {}
        self.routed: dict[str, dict[str, int]] = {}
        """Each replica's cumulative routed counts, as the task manager keeps them (a report may name
        only the counts that changed)."""

    async def on_usage(self, msg: Msg) -> None:
        usage = ExecutorUsage.model_validate_json(msg.data)
        self.latest[usage.replica_id] = usage
        self.routed.setdefault(usage.replica_id, {}).update(usage.routed)

    def routed_to(self, executor_id: str) -> int:
        return sum(counts.get(executor_id, 0) for counts in self.routed.values())

    async def wait(self, version: int, outstanding: dict[str, int] | None = None) -> None:
        """Until both replicas report `version` (the acknowledgement), with `outstanding` if given."""
        async with asyncio.timeout(DEADLINE):
            while not (
                set(self.latest) >= REPLICAS
                and all(
                    u.version == version and (outstanding is None or u.outstanding == outstanding)
                    for u in self.latest.values()
                )
            ):
                await asyncio.sleep(0.02)


async def test_invocations_route_from_a_published_table_and_fall_back_when_it_fails(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    echo = lib.Echo(label="tables")
    executor, tm = await control_plane.deploy(echo, ranks=[7])
    key = echo.deployment_key
    nc = control_plane.nc
    reports = Reports()
    sub = await nc.subscribe(tm_subject(key, "usage"), cb=reports.on_usage)

    async def publish(version: int, entries: list[TableEntry]) -> None:
        table = ExecutorTable(task_key=key, instance="i1", version=version, executors=entries, interval_s=30)
        await nc.publish(tm_subject(key, "table"), table.model_dump_json().encode())
        await nc.flush()
        await reports.wait(version)

    client = DispatcherClient(nc, timeout_s=30)
    try:
        await publish(1, [TableEntry(executor_id=executor.executor_id, url=executor.url, sidecar_ranks=[7])])
        with use_graph_runner(client):
            async with asyncio.timeout(DEADLINE):
                outs = await asyncio.gather(*(echo(lib.EchoIn(text=f"t{i}")) for i in range(6)))
        assert [o.text for o in outs] == [f"T{i}" for i in range(6)]
        assert {o.executor for o in outs} == {executor.executor_id}
        # No route request and no RouteDone: the replicas picked from the table and report usage instead.
        assert tm.routes == 0 and tm.done == []
        # The replicas' cumulative counts (the task manager's routed counters) add up to the six calls,
        # none of them outstanding any more.
        async with asyncio.timeout(DEADLINE):
            while reports.routed_to(executor.executor_id) < 6:
                await asyncio.sleep(0.02)
        await reports.wait(1, outstanding={})
        assert reports.routed_to(executor.executor_id) == 6

        # A table naming an executor that is gone: the invocation fails retryably (503), the replica
        # drops the table and asks the task manager, which answers with its live executor.
        await publish(
            2, [TableEntry(executor_id="gone", url=f"http://127.0.0.1:{free_port()}", sidecar_ranks=[7])]
        )
        failures: list[DispatchError] = []
        with use_graph_runner(client):
            for _ in range(len(REPLICAS) + 1):
                try:
                    async with asyncio.timeout(DEADLINE):
                        out = await echo(lib.EchoIn(text="back"))
                except DispatchError as exc:
                    failures.append(exc)
                    continue
                break
            else:
                pytest.fail(f"never fell back to the task manager: {failures}")
        assert out.text == "BACK" and out.executor == executor.executor_id
        assert 1 <= len(failures) <= len(REPLICAS)
        for failure in failures:
            assert (failure.code, failure.error) == (503, "task_unavailable")
            assert "refused the connection" in str(failure)
        assert tm.routes >= 1
        assert await tm.wait_done(tm.routes) == [executor.executor_id] * tm.routes
    finally:
        # An empty table: the module's other tests route through their stand-in task managers again.
        await publish(3, [])
        await sub.unsubscribe()


async def test_a_refused_invocation_channel_drops_the_table_and_http_serves_the_retry(
    control_plane: StandInControlPlane, lib: types.ModuleType
) -> None:
    """A table entry advertising an invocation channel nobody listens on: the unary call is refused
    (503, retryable) like a refused HTTP connection, the replica drops the table, and the task
    manager's route (no channel advertised, as for the echo executor) is called over HTTP."""
    echo = lib.Echo(label="channel-refused")
    executor, tm = await control_plane.deploy(echo, ranks=[7])
    key = echo.deployment_key
    nc = control_plane.nc
    reports = Reports()
    sub = await nc.subscribe(tm_subject(key, "usage"), cb=reports.on_usage)

    async def publish(version: int, entries: list[TableEntry]) -> None:
        table = ExecutorTable(task_key=key, instance="i1", version=version, executors=entries, interval_s=30)
        await nc.publish(tm_subject(key, "table"), table.model_dump_json().encode())
        await nc.flush()
        await reports.wait(version)

    client = DispatcherClient(nc, timeout_s=30)
    try:
        entry = TableEntry(
            executor_id=executor.executor_id,
            url=executor.url,
            sidecar_ranks=[7],
            channel=f"127.0.0.1:{free_port()}",
        )
        await publish(1, [entry])
        failures: list[DispatchError] = []
        with use_graph_runner(client):
            for _ in range(len(REPLICAS) + 1):
                try:
                    async with asyncio.timeout(DEADLINE):
                        out = await echo(lib.EchoIn(text="http"))
                except DispatchError as exc:
                    failures.append(exc)
                    continue
                break
            else:
                pytest.fail(f"never fell back to the task manager: {failures}")
        assert out.text == "HTTP" and out.executor == executor.executor_id
        assert 1 <= len(failures) <= len(REPLICAS)
        for failure in failures:
            assert (failure.code, failure.error) == (503, "task_unavailable")
            assert "refused the connection (ChannelRefused)" in str(failure)
        # Nothing reached the executor over the channel; the one call that did came over HTTP.
        assert [name for name, _ in executor.requests] == ["echo"]
        assert tm.routes >= 1
    finally:
        await publish(2, [])
        await sub.unsubscribe()
