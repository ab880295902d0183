"""`python -m cornserve.eric`: the command line `EricDescriptor.launch_spec` writes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pydantic import ValidationError

from cornserve.bus.lifecycle import required_sidecar_ranks_arg, run_executor
from cornserve.eric.server import EricConfig, EricServer, StartupError

logger = logging.getLogger("cornserve.eric")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of EricDescriptor's command line (plus a few tuning knobs with defaults)."""
    p = argparse.ArgumentParser(
        prog="python -m cornserve.eric", description="Eric, Cornserve's encoder server"
    )
    p.add_argument("--model-id", required=True, help="local checkpoint directory or Hub id")
    p.add_argument("--modality", required=True, help="the one modality this server encodes (image, video)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--sidecar-ranks",
        type=required_sidecar_ranks_arg,
        required=True,
        help="comma-separated; the first one sends",
    )
    p.add_argument("--media-timeout", type=float, default=30.0, help="seconds to fetch one media item")
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM"
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EricConfig:
    """Validate the command line and environment (CORNSERVE_NATS_URL, CORNSERVE_EXECUTOR_ID)."""
    from cornserve.runtime.nats_url import nats_url_from_env

    try:
        return EricConfig(
            model_id=args.model_id,
            modality=args.modality,
            max_batch_size=args.max_batch_size,
            tensor_parallel_size=args.tensor_parallel_size,
            host=args.host,
            port=args.port,
            sidecar_ranks=args.sidecar_ranks,
            nats_url=nats_url_from_env(),
            executor_id=os.environ.get("CORNSERVE_EXECUTOR_ID", "eric"),
            media_timeout_s=args.media_timeout,
            drain_timeout_s=args.drain_timeout,
        )
    except ValidationError as exc:
        raise SystemExit(f"invalid Eric arguments: {exc}") from None


async def serve(config: EricConfig) -> int:
    """Run until SIGTERM/SIGINT (0), or 1 if Eric could not start."""
    server = EricServer(config)
    return await run_executor(
        server,
        f"Eric {config.executor_id}",
        f"{config.host}:{config.port}",
        logger,
        expected_errors=(StartupError,),
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m cornserve.eric`."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(asyncio.run(serve(config_from_args(args))))
