"""Executor processes launched from their descriptors, and a small HTTP graph runner that drives
them the way the dispatcher service does (without being one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from pydantic import TypeAdapter
from tests.support.cluster import ProcessCluster
from tests.support.processes import ServiceProcess
from tests.support.sidecars import SidecarProcess
from tests.support.waiting import wait_healthy

from cornserve.runtime.process import free_ports
from cornserve.task import (
    Device,
    ExecutorPlacement,
    Stream,
    TaskExecutionError,
    TaskInvocation,
    TaskOutput,
    UnitTask,
    wire_forwards,
)

_INVOCATIONS = TypeAdapter(list[TaskInvocation])
HEALTH_DEADLINE_CAP_S = 90.0


@dataclass
class LaunchedExecutor:
    """One executor process, launched exactly as a task manager launches it."""

    task: UnitTask[Any, Any]
    executor_id: str
    ranks: list[int]
    port: int
    service: ServiceProcess
    health_path: str
    ready_timeout_s: float
    channel_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def channel(self) -> str:
        """``host:port`` of its invocation channel (launched with one, as task managers launch them)."""
        assert self.channel_port is not None
        return f"127.0.0.1:{self.channel_port}"

    @property
    def proc(self) -> Any:
        return self.service.proc

    def log(self) -> str:
        return self.service.log()

    def wait_ready(self) -> dict[str, Any]:
        """Poll the health path until 200 (deadline: the spec's ready_timeout_s, capped for tests)."""
        body: dict[str, Any] = wait_healthy(
            self.url,
            process=self.service,
            path=self.health_path,
            timeout=min(self.ready_timeout_s, HEALTH_DEADLINE_CAP_S),
        )
        return body

    def stop(self) -> int:
        return self.service.stop()


def launch_executor(
    task: UnitTask[Any, Any],
    executor_id: str,
    ranks: list[int],
    nats_url: str,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> LaunchedExecutor:
    """Spawn an executor from `task.descriptor.launch_spec(...)`, as the task manager does (plus `env`)."""
    port, channel_port = free_ports(2)
    placement = ExecutorPlacement(
        executor_id=executor_id,
        port=port,
        devices=[Device(kind="cpu", index=r) for r in ranks],
        sidecar_ranks=ranks,
        nats_url=nats_url,
        channel_port=channel_port,
    )
    spec = task.descriptor.launch_spec(task, placement)
    service = ServiceProcess.start(
        f"executor-{executor_id}", spec.command, log_dir, {**spec.env, **(env or {})}
    )
    return LaunchedExecutor(
        task,
        executor_id,
        ranks,
        spec.port,
        service,
        spec.health_path,
        spec.ready_timeout_s,
        spec.channel_port,
    )


@dataclass
class ExecutorSetup:
    """The module's sidecars and one executor per tensor-math unit task."""

    cluster: ProcessCluster
    lib: ModuleType
    sidecars: list[SidecarProcess]
    executors: dict[str, LaunchedExecutor]  # by task class name

    @property
    def nats_url(self) -> str:
        return self.cluster.nats_url

    @property
    def log_dir(self) -> Path:
        return self.cluster.log_dir

    def by_key(self) -> dict[str, LaunchedExecutor]:
        return {e.task.deployment_key: e for e in self.executors.values()}


@dataclass
class HttpRunner:
    """Executes graphs against executor processes over HTTP, following the dispatcher's steps.

    JSON round trip of the invocations, forwards wired to the executors' sidecar ranks, each
    request built by the task's descriptor, all sent concurrently; the first failure cancels the rest.
    """

    executors: dict[str, LaunchedExecutor]  # deployment key -> executor
    session: aiohttp.ClientSession
    timeout: float = 60.0
    responses: list[int] = field(default_factory=list)

    def route(self, invocations: Sequence[TaskInvocation]) -> list[TaskInvocation]:
        wire = _INVOCATIONS.validate_json(_INVOCATIONS.dump_json(list(invocations)))
        wire_forwards(wire, [self.executors[inv.task.deployment_key].ranks for inv in wire])
        return wire

    async def run_one(self, position: int, inv: TaskInvocation) -> TaskOutput:
        executor = self.executors[inv.task.deployment_key]
        descriptor = inv.task.descriptor
        req = descriptor.to_request(inv.task, inv)
        resp = await self.session.request(req.method, executor.url + req.path, json=req.body)
        self.responses.append(resp.status)
        if resp.status != 200:
            try:
                message = (await resp.json())["error"]
            finally:
                resp.release()
            raise TaskExecutionError(message, task_name=inv.task.display_name(), position=position)
        if req.stream:
            return Stream.from_iterator(self._lines(descriptor, inv, resp))
        try:
            return descriptor.from_response(inv.task, inv, await resp.json())
        finally:
            resp.release()

    @staticmethod
    async def _lines(
        descriptor: Any, inv: TaskInvocation, resp: aiohttp.ClientResponse
    ) -> AsyncIterator[Any]:
        try:
            async with asyncio.timeout(60):
                async for raw in resp.content:
                    item = descriptor.from_stream_line(inv.task, inv, raw.decode())
                    if item is not None:
                        yield item
        finally:
            resp.release()

    async def run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        wire = self.route(invocations)
        try:
            async with asyncio.timeout(self.timeout), asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.run_one(i, inv)) for i, inv in enumerate(wire)]
        except* TaskExecutionError as failed:
            raise failed.exceptions[0] from None
        return [t.result() for t in tasks]
