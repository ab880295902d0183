"""The gateway's calls to the resource manager."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from nats.aio.client import Client

from cornserve.bus.control import (
    RM_DEPLOY,
    RM_RELEASE,
    RM_SCALE,
    RM_STATE,
    ClusterState,
    DeploymentInfo,
    DeployReply,
    DeployRequest,
    ProgressEvent,
    ReleaseReply,
    ReleaseRequest,
    ScaleRequest,
    StateRequest,
    rm_progress_subject,
)
from cornserve.bus.micro import request
from cornserve.task import UnitTask, serialize_task

STATE_TIMEOUT_S = 15.0
RELEASE_TIMEOUT_S = 120.0
MARGIN_S = 15.0


class ResourceManagerClient:
    """Deploy, release, scale and inspect unit tasks through the resource manager."""

    def __init__(self, nc: Client, deploy_timeout_s: float = 900.0) -> None:
        self._nc = nc
        self.deploy_timeout_s = deploy_timeout_s

    async def deploy(
        self,
        owner: str,
        tasks: list[UnitTask[Any, Any]],
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> DeployReply:
        """Deploy `tasks` for `owner`; progress events go to `on_progress` while waiting."""
        req = DeployRequest(
            owner=owner, tasks=[serialize_task(t) for t in tasks], timeout_s=self.deploy_timeout_s
        )
        sub = None
        if on_progress is not None:
            callback = on_progress

            async def relay(msg: Any) -> None:
                callback(ProgressEvent.model_validate_json(msg.data))

            sub = await self._nc.subscribe(rm_progress_subject(req.request_id), cb=relay)
        try:
            return await request(
                self._nc, RM_DEPLOY, req, DeployReply, timeout=self.deploy_timeout_s + MARGIN_S
            )
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def deploy_with_progress(
        self, owner: str, tasks: list[UnitTask[Any, Any]]
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

    async def release(self, owner: str) -> ReleaseReply:
        """Drop `owner` from its tasks; tasks nobody uses any more are torn down."""
        return await request(
            self._nc, RM_RELEASE, ReleaseRequest(owner=owner), ReleaseReply, timeout=RELEASE_TIMEOUT_S
        )

    async def state(self) -> ClusterState:
        """Every deployment and device."""
        return await request(self._nc, RM_STATE, StateRequest(), ClusterState, timeout=STATE_TIMEOUT_S)

    async def scale(self, task_key: str, num_executors: int) -> DeploymentInfo:
        """Run `num_executors` executors of a deployed task."""
        req = ScaleRequest(task_key=task_key, num_executors=num_executors, timeout_s=self.deploy_timeout_s)
        return await request(
            self._nc, RM_SCALE, req, DeploymentInfo, timeout=self.deploy_timeout_s + MARGIN_S
        )
