"""The durable deployment records (KV_DEPLOYMENTS) a restarted resource manager recovers from."""

from __future__ import annotations

from dataclasses import dataclass

from nats.aio.client import Client
from nats.js.kv import KeyValue

from cornserve.bus.control import KV_DEPLOYMENTS, DeploymentRecord
from cornserve.bus.kv import kv_all, kv_delete, kv_put, open_bucket
from cornserve.resource_manager.deployment import Deployment


@dataclass
class DeploymentStore:
    """Task key -> DeploymentRecord in the JetStream KV bucket."""

    nc: Client
    _kv: KeyValue | None = None

    async def open(self) -> None:
        """Open (or create) the bucket."""
        self._kv = await open_bucket(self.nc, KV_DEPLOYMENTS)

    @property
    def kv(self) -> KeyValue:
        """The bucket (after :meth:`open`)."""
        assert self._kv is not None, "DeploymentStore.open() not called"
        return self._kv

    async def save(self, dep: Deployment) -> None:
        """Store the current record of `dep`."""
        await kv_put(self.kv, dep.task_key, dep.record())

    async def delete(self, task_key: str) -> None:
        """Forget a torn-down deployment."""
        await kv_delete(self.kv, task_key)

    async def records(self) -> list[DeploymentRecord]:
        """Every stored record."""
        return await kv_all(self.kv, DeploymentRecord)
