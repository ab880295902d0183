"""`cornserve-resource-manager`: the process that owns devices and task managers.

On SIGTERM/SIGINT it stops serving and exits, leaving its task managers and their executors
running: the data plane keeps serving, and the next start adopts it (as after a crash). Stopping
the data plane is a separate, explicit step: `cornserve up` stops the task managers recorded in
`--task-manager-dir` when the whole cluster stops. While it runs, a reconciliation loop converges
the task managers to the deployment records (`reconcile`).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar, Literal

from nats.aio.client import Client
from pydantic import Field, ValidationError

from cornserve.resource_manager.devices import DeviceInventory, DeviceKind, discover_devices
from cornserve.resource_manager.k8s_pods import KubernetesSettings
from cornserve.resource_manager.k8s_spawner import KubernetesSpawner, pod_env
from cornserve.resource_manager.manager import ResourceManager
from cornserve.resource_manager.service import ResourceManagerService
from cornserve.resource_manager.spawner import LocalSubprocessSpawner, NodeAgents, Spawner, spawner_devices
from cornserve.runtime.service import run_service
from cornserve.runtime.settings import ProcessInfo, ServiceSettings

logger = logging.getLogger("cornserve.resource_manager")


class ResourceManagerSettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of `cornserve-resource-manager`."""

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "resource-manager", "cornserve-resource-manager", "Cornserve resource manager"
    )

    cpu_slots: int = Field(default=4, ge=1)
    """CPU slots when no GPU is present."""
    device_kind: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: GPUs when present, else CPU slots; cpu: CPU slots even with GPUs."""
    node: str = Field(default="local", min_length=1)
    """Node id of this machine's devices and sidecars."""
    spawner: Literal["local", "docker", "kubernetes"] = "local"
    """How task managers are started: local processes, containers on Docker engines (--docker-config),
    or pods through the Kubernetes API (--k8s-settings)."""
    docker_config: Path | None = None
    """JSON file of the docker spawner: its nodes (name, engine, address, devices), image and mounts."""
    k8s_settings: Path | None = None
    """JSON file of the `kubernetes` spawner's settings (namespace, images, node label, secrets, ...;
    `cornserve.resource_manager.k8s_pods.KubernetesSettings`); none: their defaults."""
    k8s_kubeconfig: Path | None = None
    """kubeconfig of the `kubernetes` spawner (default: in-cluster service account, else KUBECONFIG)."""
    log_dir: Path | None = None
    """Task manager and executor logs (default: a new temp dir)."""
    task_manager_nats_creds: Path | None = None
    """NATS credentials file of the task-manager role, handed to task managers (none: they get none)."""
    task_manager_dir: Path | None = None
    """Process records of the task managers (one file each), read to stop the data plane (default: <log dir>/task-managers)."""
    task_manager_metrics: bool = False
    """Start each task manager with a metrics port of its own (its URL shows in GET /tasks as metrics_url)."""
    reconcile_interval: float = Field(default=5.0, gt=0, le=3600)
    """Seconds between reconciliation passes (dead task managers re-created, missing executors restored, orphans reaped)."""


def make_spawner(
    name: str,
    log_dir: Path,
    log_level: str,
    nats_creds: Path | None = None,
    records_dir: Path | None = None,
    metrics: bool = False,
    *,
    k8s_settings: Path | None = None,
    k8s_kubeconfig: Path | None = None,
    docker_config: Path | None = None,
    nats_url: str = "",
    device_kind: DeviceKind = "auto",
    cpu_slots: int = 4,
) -> Spawner:
    """The spawner named on the command line; `nats_creds` is the task managers' credentials file.

    The `kubernetes` spawner's pods get their credentials from Secrets its settings name (the
    local `nats_creds` file is not theirs to read).
    """
    if name == "local":
        return LocalSubprocessSpawner(log_dir, log_level, nats_creds, records_dir, metrics=metrics)
    if name == "kubernetes":
        return KubernetesSpawner(
            load_k8s_settings(k8s_settings),
            log_level=log_level,
            kubeconfig=str(k8s_kubeconfig) if k8s_kubeconfig else None,
            env=pod_env(os.environ, TASK_MANAGER_PASSED_ENV),
            device_kind=device_kind,
            cpu_slots=cpu_slots,
        )
    if name == "docker":
        if docker_config is None:
            raise ValueError("--spawner docker needs --docker-config FILE (its nodes and image)")
        from cornserve.resource_manager.docker_config import DockerSpawnerConfig
        from cornserve.resource_manager.docker_spawner import DockerSpawner

        return DockerSpawner(
            DockerSpawnerConfig.load(docker_config), log_dir, log_level, nats_creds, nats_url
        )
    raise ValueError(f"unknown spawner {name!r}")


TASK_MANAGER_PASSED_ENV = ("CORNSERVE_ALLOW_EXECUTOR_FLAGS", "CORNSERVE_LOG_FORMAT")
"""Settings a task-manager pod gets from the resource manager's environment (local ones inherit it all)."""


def load_k8s_settings(path: Path | None) -> KubernetesSettings:
    """The `kubernetes` spawner's settings from a JSON file (defaults without one); a clear error if invalid."""
    if path is None:
        return KubernetesSettings()
    try:
        return KubernetesSettings.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"--k8s-settings {path}: cannot read it: {exc.strerror}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<file>'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ValueError(f"--k8s-settings {path}: {problems}") from exc


@asynccontextmanager
async def serve(settings: ResourceManagerSettings, nc: Client) -> AsyncIterator[None]:
    """Serve while the context is open; leaving it stops serving and leaves the task managers running."""
    log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="cornserve-rm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    spawner = make_spawner(
        settings.spawner,
        log_dir,
        settings.log_level,
        settings.task_manager_nats_creds,
        settings.task_manager_dir,
        metrics=settings.task_manager_metrics,
        docker_config=settings.docker_config,
        nats_url=settings.nats_url,
        k8s_settings=settings.k8s_settings,
        k8s_kubeconfig=settings.k8s_kubeconfig,
        device_kind=settings.device_kind,
        cpu_slots=settings.cpu_slots,
    )
    if isinstance(spawner, NodeAgents):  # before the inventory: the kubernetes spawner learns its nodes here
        await spawner.start()
    devices = spawner_devices(
        spawner, lambda: discover_devices(settings.device_kind, settings.cpu_slots, settings.node)
    )
    manager = ResourceManager(
        nc,
        settings.nats_url,
        DeviceInventory(devices),
        spawner,
        reconcile_interval_s=settings.reconcile_interval,
    )
    if isinstance(spawner, KubernetesSpawner):
        # A pod's node and GPU count follow from the devices its executors were given.
        spawner.devices_of = lambda key: (
            manager.deployments[key].devices if key in manager.deployments else ()
        )
    service = ResourceManagerService(
        nc,
        manager,
        metadata={
            "node": settings.node,
            "nodes": ",".join(dict.fromkeys(d.node for d in devices)),
            "devices": str(len(devices)),
            "device_kind": devices[0].kind,
        },
    )
    try:
        await manager.start()
        await service.start()
        logger.info(
            "resource manager serving: %d %s device(s) on node(s) %s, logs in %s",
            len(devices),
            devices[0].kind,
            ", ".join(dict.fromkeys(d.node for d in devices)),
            log_dir,
        )
        yield
    finally:
        await service.stop()
        await manager.close()
        if isinstance(spawner, KubernetesSpawner):
            await spawner.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `cornserve-resource-manager`."""
    sys.exit(run_service(ResourceManagerSettings, serve, argv=argv))


if __name__ == "__main__":
    main()
