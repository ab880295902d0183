"""A task manager's typed client; nothing else sends to ``cornserve.tm.<task key>.*``.

Used by the resource manager (start, inspect, assign, stop the task manager it spawned) and by
dispatchers (route an invocation, report it done). Each request takes its deadline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nats.aio.client import Client

from cornserve.bus.control import (
    AckReply,
    AssignRequest,
    DeviceInfo,
    ExecutorAssignment,
    RouteDone,
    RouteReply,
    RouteRequest,
    ShutdownRequest,
    TaskManagerStatus,
    TaskManagerStatusRequest,
    TaskManagerVerb,
    tm_subject,
)
from cornserve.bus.micro import request

ASSIGN_REPLY_MARGIN_S = 5.0
"""How much longer than the assignment's own deadline its reply is awaited, so the task manager's
timeout reply (which lists its executors' states) arrives before the caller gives up."""


@dataclass(frozen=True)
class TaskManagerClient:
    """Requests to the task manager of the deployment `task_key`."""

    nc: Client
    task_key: str

    async def route(self, timeout_s: float) -> RouteReply:
        """The executor to send one invocation to; report it with :meth:`done` when it finished."""
        return await request(self.nc, self.subject("route"), RouteRequest(), RouteReply, timeout_s)

    async def done(self, executor_id: str) -> None:
        """Report a routed invocation finished (fire and forget: publishing never waits for an answer)."""
        payload = RouteDone(executor_id=executor_id).model_dump_json().encode()
        await self.nc.publish(self.subject("done"), payload)

    async def status(self, timeout_s: float) -> TaskManagerStatus:
        """The task manager's executors and process id."""
        return await request(
            self.nc, self.subject("status"), TaskManagerStatusRequest(), TaskManagerStatus, timeout_s
        )

    async def assign(
        self, executors: Mapping[str, Sequence[DeviceInfo]], timeout_s: float
    ) -> TaskManagerStatus:
        """Run exactly `executors` (executor id -> devices); returns once all are ready, within `timeout_s`."""
        msg = AssignRequest(
            executors=[ExecutorAssignment(executor_id=e, devices=list(d)) for e, d in executors.items()],
            timeout_s=timeout_s,
        )
        return await request(
            self.nc, self.subject("assign"), msg, TaskManagerStatus, timeout_s + ASSIGN_REPLY_MARGIN_S
        )

    async def shutdown(self, timeout_s: float) -> AckReply:
        """Stop every executor; the task manager exits after answering."""
        return await request(self.nc, self.subject("shutdown"), ShutdownRequest(), AckReply, timeout_s)

    def subject(self, verb: TaskManagerVerb) -> str:
        """The subject of one of this task manager's endpoints."""
        return tm_subject(self.task_key, verb)
