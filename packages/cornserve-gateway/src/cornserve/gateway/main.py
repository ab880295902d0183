"""`cornserve-gateway`: the HTTP entry point process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, ClassVar

from aiohttp import web
from nats.aio.client import Client
from nats.micro import add_service
from pydantic import AfterValidator, Field, model_validator

from cornserve.bus.control import GATEWAY_SERVICE_NAME, KV_APPS, KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import TaskLibrarySync, open_bucket
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway import __version__
from cornserve.gateway.dispatch_client import DispatcherClient
from cornserve.gateway.routes import Gateway
from cornserve.gateway.sessions import SessionLimits, SessionRegistry
from cornserve.runtime.service import run_service
from cornserve.runtime.settings import CommaSeparated, ProcessInfo, ServiceSettings
from cornserve.task import set_graph_runner
from cornserve.task.executor_flags import check_allowed_names
from cornserve.task.library import load_task_library

logger = logging.getLogger("cornserve.gateway")


class GatewaySettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of `cornserve-gateway`."""

    process: ClassVar[ProcessInfo] = ProcessInfo("gateway", "cornserve-gateway", "Cornserve's HTTP gateway.")

    host: str = "127.0.0.1"
    """Address the HTTP API listens on."""
    port: int = Field(default=8000, ge=0, lt=65536)
    """Port of the HTTP API."""
    session_ttl: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds a client session lives without heartbeats, when it does not ask for another TTL."""
    session_max_ttl: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    """The longest TTL a client may ask for (a session holds devices until it expires)."""
    session_max_tasks: int = Field(default=16, ge=1)
    """Unit tasks one session may deploy; more are refused with 403."""
    session_max_open: int = Field(default=64, ge=1)
    """Sessions open at once; creating another is refused with 503 until one closes or expires."""
    allow_executor_flags: Annotated[CommaSeparated, AfterValidator(check_allowed_names)] = Field(
        default_factory=list
    )
    """Executor flags that widen exposure (--host, --trust-remote-code, ...) task configs may pass anyway."""
    deploy_timeout: float = Field(default=900.0, gt=0)
    """Deadline for deploying an app's tasks."""
    graph_timeout: float = Field(default=300.0, gt=0)
    """Deadline for executing one task graph."""

    @model_validator(mode="after")
    def _ttl_within_max(self) -> GatewaySettings:
        if self.session_ttl > self.session_max_ttl:
            raise ValueError(
                f"session_ttl ({self.session_ttl:g} s) exceeds session_max_ttl ({self.session_max_ttl:g} s)"
            )
        return self


def _load_library(record: TaskLibraryRecord) -> None:
    load_task_library(record.name, record.source)


@asynccontextmanager
async def serve(settings: GatewaySettings, nc: Client) -> AsyncIterator[None]:
    """Serve the HTTP API while the context is open; every part started is stopped on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        libraries = TaskLibrarySync(nc, _load_library)
        await libraries.start()
        stack.push_async_callback(libraries.stop)
        rm = ResourceManagerClient(nc, deploy_timeout_s=settings.deploy_timeout)
        dispatcher = DispatcherClient(nc, timeout_s=settings.graph_timeout)
        set_graph_runner(dispatcher)
        sessions = SessionRegistry(
            rm,
            SessionLimits(
                default_ttl_s=settings.session_ttl,
                max_ttl_s=settings.session_max_ttl,
                max_tasks=settings.session_max_tasks,
                max_open=settings.session_max_open,
            ),
            allowed_flags=settings.allow_executor_flags,
        )
        gateway = Gateway(
            nc,
            await open_bucket(nc, KV_APPS),
            await open_bucket(nc, KV_TASKLIBS),
            dispatcher,
            rm,
            sessions,
            allowed_flags=settings.allow_executor_flags,
        )
        service = await add_service(
            nc,
            name=GATEWAY_SERVICE_NAME,
            version=__version__,
            description="Cornserve HTTP gateway",
            metadata={"url": f"http://{settings.host}:{settings.port}"},
        )
        stack.push_async_callback(service.stop)
        stack.push_async_callback(sessions.stop)
        runner = web.AppRunner(gateway.app(), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, settings.host, settings.port).start()
        logger.info("gateway listening on http://%s:%d", settings.host, settings.port)
        sessions.start()

        async def recover() -> None:
            try:
                await gateway.apps.recover()
                await sessions.release_orphans()
            except Exception:
                logger.exception("recovering apps after a restart failed")

        recovery = asyncio.create_task(recover())
        try:
            yield
        finally:
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recovery


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `cornserve-gateway`."""
    sys.exit(run_service(GatewaySettings, serve, argv=argv))


if __name__ == "__main__":
    main()
