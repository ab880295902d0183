"""`cornserve-gateway`: the HTTP entry point process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

import nats
from aiohttp import web
from nats.micro import add_service

from cornserve.bus.control import GATEWAY_SERVICE_NAME, KV_APPS, KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import TaskLibrarySync, open_bucket
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway import __version__
from cornserve.gateway.dispatch_client import DispatcherClient
from cornserve.gateway.routes import Gateway
from cornserve.gateway.sessions import SessionRegistry
from cornserve.runtime.nats_url import nats_url_from_env
from cornserve.task import set_graph_runner
from cornserve.task.library import load_task_library

logger = logging.getLogger("cornserve.gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="cornserve-gateway", description="Cornserve's HTTP gateway.")
    p.add_argument("--nats-url", default=None, help="NATS URL (default: $CORNSERVE_NATS_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--session-ttl", type=float, default=60.0, help="seconds a client session lives without heartbeats"
    )
    p.add_argument(
        "--deploy-timeout", type=float, default=900.0, help="deadline for deploying an app's tasks"
    )
    p.add_argument("--graph-timeout", type=float, default=300.0, help="deadline for executing one task graph")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _load_library(record: TaskLibraryRecord) -> None:
    load_task_library(record.name, record.source)


async def serve(args: argparse.Namespace) -> None:
    """Run the gateway until SIGTERM/SIGINT."""
    nc = await nats.connect(
        args.nats_url or nats_url_from_env(), name="cornserve-gateway", max_reconnect_attempts=-1
    )
    libraries = TaskLibrarySync(nc, _load_library)
    await libraries.start()
    rm = ResourceManagerClient(nc, deploy_timeout_s=args.deploy_timeout)
    dispatcher = DispatcherClient(nc, timeout_s=args.graph_timeout)
    set_graph_runner(dispatcher)
    sessions = SessionRegistry(rm, default_ttl_s=args.session_ttl)
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
        metadata={"url": f"http://{args.host}:{args.port}"},
    )
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    logger.info("gateway listening on http://%s:%d", args.host, args.port)
    sessions.start()

    async def recover() -> None:
        try:
            await gateway.apps.recover()
            await sessions.release_orphans()
        except Exception:
            logger.exception("recovering apps after a restart failed")

    recovery = asyncio.create_task(recover())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("gateway stopping")
    recovery.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await recovery
    await runner.cleanup()
    await sessions.stop()
    await libraries.stop()
    await service.stop()
    await nc.drain()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cornserve-gateway`."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
