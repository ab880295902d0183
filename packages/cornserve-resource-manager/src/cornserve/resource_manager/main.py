"""`cornserve-resource-manager`: the process that owns devices and task managers.

On SIGTERM/SIGINT it stops serving and stops every task manager it runs (no orphans); deployment
records stay in KV_DEPLOYMENTS, so the next start re-creates them. After a crash (no clean
shutdown) the task managers keep running and the next start adopts them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import tempfile
from pathlib import Path

import nats

from cornserve.resource_manager.devices import DeviceInventory, discover_devices
from cornserve.resource_manager.manager import ResourceManager
from cornserve.resource_manager.service import ResourceManagerService
from cornserve.resource_manager.spawner import LocalSubprocessSpawner, Spawner
from cornserve.runtime.nats_url import nats_url_from_env

logger = logging.getLogger("cornserve.resource_manager")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of `cornserve-resource-manager`."""
    p = argparse.ArgumentParser(prog="cornserve-resource-manager", description="Cornserve resource manager")
    p.add_argument("--nats-url", default=None, help="NATS URL (default: $CORNSERVE_NATS_URL)")
    p.add_argument("--cpu-slots", type=int, default=4, help="CPU slots when no GPU is present (default 4)")
    p.add_argument(
        "--device-kind",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="auto: GPUs when present, else CPU slots (default); cpu: CPU slots even with GPUs",
    )
    p.add_argument("--node", default="local", help="node id of this machine's devices and sidecars")
    p.add_argument("--spawner", choices=["local"], default="local", help="how task managers are started")
    p.add_argument("--log-dir", default=None, help="task manager and executor logs (default: a temp dir)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def make_spawner(name: str, log_dir: Path, log_level: str) -> Spawner:
    """The spawner named on the command line."""
    if name == "local":
        return LocalSubprocessSpawner(log_dir, log_level)
    raise ValueError(f"unknown spawner {name!r}")


async def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT."""
    nats_url = args.nats_url or nats_url_from_env()
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="cornserve-rm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    devices = discover_devices(args.device_kind, args.cpu_slots, args.node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(
        nats_url, name="cornserve-resource-manager", max_reconnect_attempts=-1, reconnect_time_wait=0.5
    )
    manager = ResourceManager(
        nc, nats_url, DeviceInventory(devices), make_spawner(args.spawner, log_dir, args.log_level)
    )
    service = ResourceManagerService(
        nc,
        manager,
        metadata={"node": args.node, "devices": str(len(devices)), "device_kind": devices[0].kind},
    )
    try:
        await manager.start()
        await service.start()
        logger.info(
            "resource manager serving: %d %s device(s) on node %s, logs in %s",
            len(devices),
            devices[0].kind,
            args.node,
            log_dir,
        )
        await stop.wait()
        logger.info("resource manager shutting down")
    finally:
        await service.stop()
        await manager.close()
        await nc.drain()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cornserve-resource-manager`."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
