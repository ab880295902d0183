"""The resource manager's typed client; nothing else sends to ``cornserve.rm.*``.

A deploy or scale carries its deadline to the resource manager (``timeout_s``) and its reply is
awaited ``margin_s`` longer, so the resource manager's own timeout reply, which names the task that
was not ready, reaches the caller first. Failures are the bus's typed errors (``cornserve.bus.micro``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from cornserve.bus.control import (
    RM_DEPLOY,
    RM_RELEASE,
    RM_SCALE,
    RM_STATE,
    ClusterState,
    DeploymentInfo,
    DeploymentReleaseReply,
    DeploymentReleaseRequest,
    DeployReply,
    DeployRequest,
    ProgressEvent,
    ScaleRequest,
    StateRequest,
    TaskSpec,
    rm_progress_subject,
)
from cornserve.bus.micro import request


@dataclass(frozen=True)
class ResourceManagerClient:
    """Deploy, release, scale and inspect unit tasks (as `TaskSpec`s) through the resource manager."""

    nc: Client
    deploy_timeout_s: float = 900.0
    """The deadline of a deploy or scale in the resource manager."""
    margin_s: float = 15.0
    """How much longer than `deploy_timeout_s` a deploy or scale reply is awaited."""
    release_timeout_s: float = 120.0
    state_timeout_s: float = 15.0

    async def deploy(
        self,
        owner: str,
        tasks: Sequence[TaskSpec],
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> DeployReply:
        """Deploy `tasks` for `owner`; the request's ProgressEvents go to `on_progress` while waiting."""
        req = DeployRequest(owner=owner, tasks=list(tasks), timeout_s=self.deploy_timeout_s)
        sub = None
        if on_progress is not None:
            callback = on_progress

            async def relay(msg: Msg) -> None:
                callback(ProgressEvent.model_validate_json(msg.data))

            sub = await self.nc.subscribe(rm_progress_subject(req.request_id), cb=relay)
        try:
            return await request(self.nc, RM_DEPLOY, req, DeployReply, self.deploy_timeout_s + self.margin_s)
        finally:
            if sub is not None:
                # A closed connection took the subscription with it; the request's outcome is what counts.
                with contextlib.suppress(nats.errors.ConnectionClosedError):
                    await sub.unsubscribe()

    async def deploy_with_progress(
        self, owner: str, tasks: Sequence[TaskSpec]
    ) -> AsyncIterator[ProgressEvent | DeployReply]:
        """The same deploy as an async stream of progress events ending with the reply."""
        queue: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        job = asyncio.create_task(self.deploy(owner, tasks, on_progress=queue.put_nowait))
        try:
            while not job.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            yield job.result()
        finally:
            if not job.done():
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)

    async def release(self, owner: str) -> DeploymentReleaseReply:
        """Drop `owner` from its tasks; tasks nobody uses any more are torn down."""
        req = DeploymentReleaseRequest(owner=owner)
        return await request(self.nc, RM_RELEASE, req, DeploymentReleaseReply, self.release_timeout_s)

    async def state(self, timeout_s: float | None = None) -> ClusterState:
        """Every deployment and device (within `timeout_s`, default `state_timeout_s`)."""
        timeout = self.state_timeout_s if timeout_s is None else timeout_s
        return await request(self.nc, RM_STATE, StateRequest(), ClusterState, timeout)

    async def scale(self, task_key: str, num_executors: int) -> DeploymentInfo:
        """Run `num_executors` executors of a deployed task."""
        req = ScaleRequest(task_key=task_key, num_executors=num_executors, timeout_s=self.deploy_timeout_s)
        return await request(self.nc, RM_SCALE, req, DeploymentInfo, self.deploy_timeout_s + self.margin_s)
