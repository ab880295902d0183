"""`python -m cornserve.executor`: the command line of a Python task executor process."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from pydantic import ValidationError

from cornserve.bus.lifecycle import run_executor, sidecar_ranks_arg
from cornserve.executor.server import ExecutorConfig, ExecutorServer
from cornserve.runtime.nats_url import nats_url_from_env

logger = logging.getLogger("cornserve.executor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (written by PythonExecutorDescriptor.launch_spec)."""
    p = argparse.ArgumentParser(
        prog="python -m cornserve.executor", description="Cornserve Python task executor"
    )
    p.add_argument("--task-json", required=True, help="the unit task, as serialize_task() JSON")
    p.add_argument("--executor-id", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--sidecar-ranks", type=sidecar_ranks_arg, default=[], help="comma-separated; the first one is used"
    )
    p.add_argument("--nats-url", default=None, help="NATS URL (default: $CORNSERVE_NATS_URL)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to become ready")
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM"
    )
    p.add_argument(
        "--library-wait", type=float, default=10.0, help="seconds to wait for the task's library to appear"
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ExecutorConfig:
    """Validate the command line into the server's configuration."""
    try:
        task = json.loads(args.task_json)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--task-json is not JSON: {exc}") from None
    try:
        return ExecutorConfig(
            task=task,
            executor_id=args.executor_id,
            host=args.host,
            port=args.port,
            sidecar_ranks=args.sidecar_ranks,
            nats_url=args.nats_url or nats_url_from_env(),
            startup_timeout_s=args.startup_timeout,
            library_wait_s=args.library_wait,
            drain_timeout_s=args.drain_timeout,
        )
    except ValidationError as exc:
        raise SystemExit(f"invalid executor arguments: {exc}") from None


async def serve(config: ExecutorConfig) -> int:
    """Run until SIGTERM/SIGINT; 1 if the executor could not start."""
    server = ExecutorServer(config)
    return await run_executor(
        server, f"executor {config.executor_id}", f"{config.host}:{config.port}", logger
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m cornserve.executor`."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(asyncio.run(serve(config_from_args(args))))
