"""NATS wiring of the resource manager: one `nats.micro` service with deploy/release/state/scale."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from cornserve.bus.control import (
    RM_DEPLOY,
    RM_RELEASE,
    RM_SCALE,
    RM_SERVICE_NAME,
    RM_STATE,
    DeploymentReleaseRequest,
    DeployRequest,
    ScaleRequest,
    StateRequest,
)
from cornserve.bus.micro import HandlerRunner
from cornserve.resource_manager import __version__, deploy, release, scale, state
from cornserve.resource_manager.manager import ResourceManager
from cornserve.runtime.natsstop import nats_step


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
            stats_handler=lambda _endpoint: self._load(),
        )
        ctx, wrap = self.manager.ctx, self._runner.wrap
        endpoints: dict[str, tuple[str, Callable[[Request], Awaitable[None]]]] = {
            "deploy": (RM_DEPLOY, wrap(DeployRequest, partial(deploy.deploy, ctx))),
            "release": (RM_RELEASE, wrap(DeploymentReleaseRequest, partial(release.release, ctx))),
            "state": (RM_STATE, wrap(StateRequest, partial(state.cluster_state, ctx))),
            "scale": (RM_SCALE, wrap(ScaleRequest, partial(scale.scale, ctx))),
        }
        for name, (subject, handler) in endpoints.items():
            await svc.add_endpoint(name=name, subject=subject, handler=handler)
        self._service = svc

    def _load(self) -> dict[str, int]:
        """Deployments by state and free devices (the `data` of the micro STATS)."""
        ctx = self.manager.ctx
        states = [d.state for d in ctx.deployments.values()]
        return {
            "deployments": len(states),
            "ready": states.count("ready"),
            "devices": len(ctx.inventory.snapshot()),
            "free_devices": ctx.inventory.free_count(),
        }

    async def stop(self) -> None:
        """Stop serving and cancel handlers still running."""
        if self._service is not None:
            await nats_step("stopping the micro service", self._service.stop)
        await self._runner.close()
