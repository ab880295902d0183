"""NATS wiring of the resource manager: one `nats.micro` service with deploy/release/state/scale."""

from __future__ import annotations

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.service import Service

from cornserve.bus.control import (
    RM_DEPLOY,
    RM_RELEASE,
    RM_SCALE,
    RM_SERVICE_NAME,
    RM_STATE,
    DeployRequest,
    ReleaseRequest,
    ScaleRequest,
    StateRequest,
)
from cornserve.bus.micro import HandlerRunner
from cornserve.resource_manager import __version__
from cornserve.resource_manager.manager import ResourceManager


class ResourceManagerService:
    """Registers the endpoints; every handler runs in its own task (a long deploy blocks nothing)."""

    def __init__(self, nc: Client, manager: ResourceManager, metadata: dict[str, str]) -> None:
        self.nc = nc
        self.manager = manager
        self.metadata = metadata
        self._runner = HandlerRunner()
        self._service: Service | None = None

    async def start(self) -> None:
        """Register with nats.micro."""
        svc = await add_service(
            self.nc,
            name=RM_SERVICE_NAME,
            version=__version__,
            description="Cornserve resource manager: devices, deduplicated deployments, task managers",
            metadata=self.metadata,
        )
        m = self.manager
        await svc.add_endpoint(
            name="deploy", subject=RM_DEPLOY, handler=self._runner.wrap(DeployRequest, m.deploy)
        )
        await svc.add_endpoint(
            name="release", subject=RM_RELEASE, handler=self._runner.wrap(ReleaseRequest, m.release)
        )
        await svc.add_endpoint(
            name="state", subject=RM_STATE, handler=self._runner.wrap(StateRequest, m.state)
        )
        await svc.add_endpoint(
            name="scale", subject=RM_SCALE, handler=self._runner.wrap(ScaleRequest, m.scale)
        )
        self._service = svc

    async def stop(self) -> None:
        """Stop serving and cancel handlers still running."""
        if self._service is not None:
            await self._service.stop()
        await self._runner.close()
