"""`cornserve-gateway`: the HTTP entry point process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import ClassVar

from aiohttp import web
from nats.aio.client import Client
from nats.micro import add_service
from pydantic import Field

from cornserve.bus.control import GATEWAY_SERVICE_NAME, KV_APPS, KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import TaskLibrarySync, open_bucket
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway import __version__
from cornserve.gateway.dispatch_client import DispatcherClient
from cornserve.gateway.routes import Gateway
from cornserve.gateway.sessions import SessionRegistry
from cornserve.runtime.service import run_service
from cornserve.runtime.settings import ProcessInfo, ServiceSettings
from cornserve.task import set_graph_runner
from cornserve.task.library import load_task_library

logger = logging.getLogger("cornserve.gateway")


class GatewaySettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of `cornserve-gateway`."""

    process: ClassVar[ProcessInfo] = ProcessInfo("gateway", "cornserve-gateway", "Cornserve's HTTP gateway.")

    host: str = "127.0.0.1"
    """Address the HTTP API listens on."""
    port: int = Field(default=8000, ge=0, lt=65536)
    """Port of the HTTP API."""
    session_ttl: float = Field(default=60.0, gt=0)
    """Seconds a client session lives without heartbeats."""
    deploy_timeout: float = Field(default=900.0, gt=0)
    """Deadline for deploying an app's tasks."""
    graph_timeout: float = Field(default=300.0, gt=0)
    """Deadline for executing one task graph."""


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
        sessions = SessionRegistry(rm, default_ttl_s=settings.session_ttl)
        gateway = Gateway(
            nc,
            await open_bucket(nc, KV_APPS),
            await open_bucket(nc, KV_TASKLIBS),
            dispatcher,
            rm,
            sessions,
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
