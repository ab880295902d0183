"""One deployed unit task as the resource manager tracks it, and its wire/durable views."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cornserve.bus.control import (
    DeploymentInfo,
    DeploymentRecord,
    DeploymentState,
    DeviceInfo,
    TaskManagerStatus,
    TaskSpec,
)
from cornserve.resource_manager.spawner import TaskManagerHandle
from cornserve.task import UnitTask


@dataclass
class Deployment:
    """A unit task with one task manager, its executors' devices and the owners that use it."""

    task_key: str
    spec: TaskSpec
    task: UnitTask[Any, Any]
    users: list[str]
    executors: dict[str, list[DeviceInfo]]
    """Executor id -> its devices: the assignment the task manager is told to run."""
    state: DeploymentState = "deploying"
    handle: TaskManagerHandle | None = None
    status: TaskManagerStatus | None = None
    """The task manager's last answer (executor URLs, states)."""
    message: str = ""
    next_seq: int = field(default=0)

    def new_executor_id(self) -> str:
        """A fresh executor id, unique within this deployment."""
        eid = f"e{self.next_seq}"
        self.next_seq += 1
        return eid

    @property
    def devices(self) -> list[DeviceInfo]:
        """Every device of the deployment, executor by executor."""
        return [d for devs in self.executors.values() for d in devs]

    def record(self) -> DeploymentRecord:
        """The durable form stored in KV_DEPLOYMENTS."""
        return DeploymentRecord(
            task_key=self.task_key,
            task=self.spec,
            users=list(self.users),
            devices=self.devices,
            num_executors=max(1, len(self.executors)),
            tm_pid=None if self.handle is None else self.handle.pid,
        )

    def info(
        self,
        status: TaskManagerStatus | None = None,
        *,
        state: DeploymentState | None = None,
        message: str | None = None,
    ) -> DeploymentInfo:
        """The wire form, with the task manager's executors from `status` (default: the last known)."""
        status = status if status is not None else self.status
        return DeploymentInfo(
            task_key=self.task_key,
            task=self.spec,
            state=state or self.state,
            users=list(self.users),
            executors=[] if status is None else list(status.executors),
            devices=self.devices,
            message=self.message if message is None else message,
            metrics_url=None if status is None else status.metrics_url,
        )


def executor_id_seq(executor_id: str) -> int:
    """The number in an `e<N>` executor id (-1 for other ids), to continue numbering after recovery."""
    if executor_id.startswith("e") and executor_id[1:].isdigit():
        return int(executor_id[1:])
    return -1
