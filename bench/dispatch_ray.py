"""Ray Serve side of the dispatch benchmark: the same two-stage pipeline as two deployments.

`bench/dispatch.py` runs this as a child process (so Ray's driver threads stay out of the load
client's process): `python bench/dispatch_ray.py --port P`. It starts a local Ray (127.0.0.1 only,
`num_cpus=2`, no dashboard), Serve's HTTP proxy on 127.0.0.1:P, and

    POST / {"seed": s}  ->  Producer (ingress: makes the 4 KiB float32 tensor)
                        --(deployment handle, tensor as the argument)-->  Consumer (returns its sum)
                        ->  {"sum": ...}

then prints `READY <port> <ray version>` on stdout and serves until stdin closes or SIGTERM/SIGINT arrives;
then `serve.shutdown()` and `ray.shutdown()`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Under `uv run`, Ray would start every worker through `uv run` in a copy of the working directory
# (slow start, a uv sync per worker); workers here use this interpreter directly. Read at import.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray maps a node IP of 127.0.0.1 to the host's reachable address (and binds its gRPC servers
# there) unless it runs in "no cluster" mode, in which the node IP stays the loopback address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
import torch
from dispatch_tasklib import make_tensor
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

logger = logging.getLogger("bench.dispatch_ray")


class Consumer:
    """Receives the tensor (Ray pickles it into the call) and returns its sum."""

    async def consume(self, x: torch.Tensor) -> float:
        return float(x.sum())


class Producer:
    """HTTP ingress: make the tensor, hand it to the consumer through its deployment handle."""

    def __init__(self, consumer: DeploymentHandle[Any]) -> None:
        self.consumer = consumer

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        total = await self.consumer.consume.remote(make_tensor(int(body["seed"])))
        return {"sum": total}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may schedule on (this host has 2)")
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=64,
        help="per replica; Ray's default (5) would queue a concurrency-32 load in the router",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # The parent closing our stdin (or dying) also means stop.
    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    bench_dir = str(Path(__file__).resolve().parent)
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        # Replicas unpickle references to dispatch_tasklib.make_tensor: they need bench/ importable.
        runtime_env={"env_vars": {"PYTHONPATH": bench_dir}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        options: dict[str, Any] = {
            "num_replicas": 1,
            "max_ongoing_requests": args.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": 0.5},
        }
        consumer = serve.deployment(**options)(Consumer)
        app = serve.deployment(**options)(Producer).bind(consumer.bind())
        serve.run(app, name="dispatch-bench", route_prefix="/")
        print(f"READY {args.port} {ray.__version__}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
    logger.info("ray serve stopped")


if __name__ == "__main__":
    main()
