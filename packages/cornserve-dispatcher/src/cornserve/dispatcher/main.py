"""`cornserve-dispatcher` (or `python -m cornserve.dispatcher.main`): run one dispatcher replica."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket

from cornserve.dispatcher.service import DispatcherService
from cornserve.runtime.nats_url import nats_url_from_env

logger = logging.getLogger("cornserve.dispatcher")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of `cornserve-dispatcher`."""
    p = argparse.ArgumentParser(
        prog="cornserve-dispatcher",
        description="Cornserve task dispatcher replica: executes recorded task graphs on executors",
    )
    p.add_argument(
        "--nats-url", default=nats_url_from_env(), help="NATS server (default: $CORNSERVE_NATS_URL)"
    )
    p.add_argument(
        "--replica-id",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="name of this replica in `nats micro` metadata and logs (default: host-pid)",
    )
    p.add_argument(
        "--route-timeout",
        type=float,
        default=10.0,
        help="seconds a task manager has to pick an executor for one invocation",
    )
    p.add_argument(
        "--state-timeout",
        type=float,
        default=3.0,
        help="seconds the resource manager has to answer one state query",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds running graphs and streams get to finish before they are failed",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    """Run one replica until SIGTERM/SIGINT, then shut it down cleanly."""
    service = DispatcherService(
        args.nats_url,
        args.replica_id,
        route_timeout_s=args.route_timeout,
        state_timeout_s=args.state_timeout,
        drain_timeout_s=args.drain_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await stop.wait()
    logger.info("replica %s shutting down", args.replica_id)
    await service.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cornserve-dispatcher` console script."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [dispatcher %(process)d]: %(message)s",
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
