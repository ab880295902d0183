"""What the resource manager announces: progress of one request, and every change of a deployment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from nats.aio.client import Client

from cornserve.bus.control import (
    RM_EVENTS,
    DeploymentEvent,
    DeploymentInfo,
    ProgressEvent,
    rm_progress_subject,
)

ProgressStage = Literal[
    "queued", "allocating", "starting_task_manager", "starting_executors", "ready", "shared", "failed"
]
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Announcer:
    """Publishes ProgressEvents (per request) and DeploymentEvents (fan-out to every dispatcher)."""

    nc: Client

    async def progress(self, request_id: str, key: str, stage: ProgressStage, message: str = "") -> None:
        """One step of a deploy or scale request, for a caller that follows its progress."""
        if not _SUBJECT_TOKEN.match(request_id):
            return  # not a subject token: nobody can be subscribed to its progress subject
        event = ProgressEvent(request_id=request_id, task_key=key, stage=stage, message=message)
        await self.nc.publish(rm_progress_subject(request_id), event.model_dump_json().encode())

    async def changed(self, kind: Literal["ready", "updated", "removed"], info: DeploymentInfo) -> None:
        """A deployment became ready, changed, or was removed."""
        await self.nc.publish(
            RM_EVENTS, DeploymentEvent(kind=kind, deployment=info).model_dump_json().encode()
        )
