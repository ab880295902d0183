"""The resource manager: deduplicated, reference-counted deployments on a device inventory.

One task manager per distinct `deployment_key`, shared by every owner (app or client session) that
deploys an equal unit task. This coordinator only builds the shared state (`context`) and runs its
start (recovery) and close; the operations the service serves take that state and live in their own
modules (`deploy`, `release`, `scale`, `state`), as do recovery on start (`recovery`), the durable
records (`store`), the per-key locks (`locks`) and the requests to task managers (`task_managers`).
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client

from cornserve.resource_manager import recovery
from cornserve.resource_manager.context import ResourceManagerContext
from cornserve.resource_manager.deployment import Deployment
from cornserve.resource_manager.devices import DeviceInventory
from cornserve.resource_manager.events import Announcer
from cornserve.resource_manager.reconcile import Reconciler
from cornserve.resource_manager.spawner import Spawner, unavailable_nodes
from cornserve.resource_manager.store import DeploymentStore
from cornserve.resource_manager.task_managers import TaskManagerControl, TaskManagerTimeouts
from cornserve.resource_manager.tasks import TaskLoader

logger = logging.getLogger(__name__)


NODES_DEADLINE_S = 60.0
"""How long the start waits for the spawner backend to say which nodes are down."""


class ResourceManager:
    """Devices, deployments and the task managers behind them."""

    def __init__(
        self,
        nc: Client,
        nats_url: str,
        inventory: DeviceInventory,
        spawner: Spawner,
        *,
        task_manager_timeouts: TaskManagerTimeouts | None = None,
        lock_timeout_s: float = 900.0,
        recovery_timeout_s: float = 600.0,
        reconcile_interval_s: float = 5.0,
    ) -> None:
        self.ctx = ResourceManagerContext(
            inventory=inventory,
            store=DeploymentStore(nc),
            announcer=Announcer(nc),
            task_managers=TaskManagerControl(
                nc, nats_url, spawner, task_manager_timeouts or TaskManagerTimeouts()
            ),
            tasks=TaskLoader(nc),
            lock_timeout_s=lock_timeout_s,
            recovery_timeout_s=recovery_timeout_s,
        )
        self.reconciler = Reconciler(self.ctx, interval_s=reconcile_interval_s)

    @property
    def deployments(self) -> dict[str, Deployment]:
        """Deployments by task key."""
        return self.ctx.deployments

    async def start(self) -> None:
        """Open the store, load task libraries, adopt or re-spawn stored deployments, start reconciling."""
        await self.ctx.store.open()
        await self.ctx.tasks.start()
        try:  # before recovery, so that deployments on a down node are re-placed, not re-spawned there
            down = await asyncio.wait_for(unavailable_nodes(self.ctx.task_managers.spawner), NODES_DEADLINE_S)
        except TimeoutError:
            logger.warning("the spawner backend did not say within %g s which nodes are up", NODES_DEADLINE_S)
        else:
            self.ctx.inventory.set_down(down)
        await recovery.recover(self.ctx)
        self.reconciler.start()

    async def close(self) -> None:
        """Stop this process's work; task managers and executors keep running for the next one to adopt.

        Stopping the data plane is explicit: :meth:`stop_task_managers`, or (for `cornserve up`) the
        spawner's process records, which `up` stops at a full shutdown.
        """
        await self.reconciler.stop()
        background = list(self.ctx.background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self.ctx.tasks.stop()

    async def stop_task_managers(self) -> None:
        """Stop every task manager of every deployment (their records stay, so a restart re-creates them)."""
        deps = list(self.ctx.deployments.values())
        await asyncio.gather(*(self.ctx.task_managers.stop(dep) for dep in deps))
