"""What the resource manager's operations share: deployments, devices, locks, store and task managers."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cornserve.bus.control import DeviceInfo
from cornserve.resource_manager.deployment import Deployment
from cornserve.resource_manager.devices import DeviceInventory
from cornserve.resource_manager.events import Announcer
from cornserve.resource_manager.locks import KeyLocks
from cornserve.resource_manager.placement import PlacementRequest
from cornserve.resource_manager.spawner import one_node_per_deployment
from cornserve.resource_manager.store import DeploymentStore
from cornserve.resource_manager.task_managers import TaskManagerControl
from cornserve.resource_manager.tasks import TaskLoader, devices_per_executor
from cornserve.task import UnitTask


@dataclass
class ResourceManagerContext:
    """The state of one resource manager; each operation module takes it as its first argument.

    Every change of one key's deployment happens under `locks.held(key)`.
    """

    inventory: DeviceInventory
    store: DeploymentStore
    announcer: Announcer
    task_managers: TaskManagerControl
    tasks: TaskLoader
    lock_timeout_s: float = 900.0
    """How long an operation waits for another one on the same task key."""
    recovery_timeout_s: float = 600.0
    """Re-spawning a task manager after a restart, or restoring executors after a failed scale-up."""
    locks: KeyLocks = field(default_factory=KeyLocks)
    deployments: dict[str, Deployment] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    """Work that outlives a request (re-spawns after a restart); cancelled on close."""

    async def discard(self, dep: Deployment) -> None:
        """Forget a deployment that never became (or no longer is) ready: free devices, kill its TM."""
        self.deployments.pop(dep.task_key, None)
        self.inventory.release(dep.task_key)
        await asyncio.shield(self.task_managers.kill(dep))

    async def persist_and_announce(self, dep: Deployment, kind: Literal["ready", "updated"]) -> None:
        """Store the deployment's record and tell every dispatcher it changed."""
        await self.store.save(dep)
        await self.announcer.changed(kind, dep.info())

    def place_executors(
        self,
        key: str,
        task: UnitTask[Any, Any],
        count: int,
        users: Iterable[str],
        keep: Mapping[str, Sequence[DeviceInfo]] | None = None,
    ) -> list[list[DeviceInfo]]:
        """Devices for `count` new executors of `task`, by the placement rules (`placement`).

        `keep`: the task's executors that stay (replicas are spread away from their nodes); the
        nodes of other deployments sharing an owner with `users` are preferred (same-node forwards).
        """
        placed = Counter(devs[0].node for devs in (keep or {}).values() if devs)
        owners = set(users)
        affinity = frozenset(
            d.node
            for other in self.deployments.values()
            if other.task_key != key and owners & set(other.users)
            for d in other.devices
        )
        one_node = one_node_per_deployment(self.task_managers.spawner)
        req = PlacementRequest(
            key, devices_per_executor(task), count, task.placement, placed, affinity, one_node=one_node
        )
        return self.inventory.place(req)
