"""Executors as containers on their devices' node (`--executor-containers FILE`, the docker spawner's).

Without the setting an executor is a process of the task manager (`ProcessGroup`), on the task
manager's machine. With it, each executor is a container on the Docker engine of the node of its
devices, in that node's IPC namespace (so it shares the node's ``/dev/shm`` with the node's
sidecars) and on the host's network, listening on the node's address: one deployment's executors
can then run on several nodes. The file is written by the resource manager's docker spawner; this
module only reads it.

`ContainerProcess` offers what `ManagedExecutor` uses of a `ProcessGroup` (exit code, liveness,
stop with a grace period); every Docker call has the client's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

LABEL_CLUSTER = "org.cornserve.cluster"
LABEL_NODE = "org.cornserve.node"
LABEL_ROLE = "org.cornserve.role"
LABEL_TASK_KEY = "org.cornserve.task-key"


class ContainerNode(BaseModel):
    """Where one node's executors run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str
    """The node's Docker engine (as DOCKER_HOST would name it)."""
    address: str
    """The address executors listen on and are routed to."""
    ipc_container: str
    """The container whose IPC namespace (and /dev/shm) the node's containers share."""


class ExecutorContainers(BaseModel):
    """The `--executor-containers` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: str
    image: str
    user: str
    mounts: list[Path] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    nodes: dict[str, ContainerNode]
    engine_timeout_s: float = Field(default=20.0, gt=0, le=600)

    @classmethod
    def load(cls, path: Path) -> ExecutorContainers:
        """Read and validate the file."""
        return cls.model_validate_json(path.read_text())

    def node(self, name: str) -> ContainerNode:
        """A node of the file; a clear error for one it does not name."""
        if name not in self.nodes:
            raise KeyError(
                f"node {name!r} is not in the executor-containers file (nodes: {sorted(self.nodes)})"
            )
        return self.nodes[name]


_CLIENTS: dict[tuple[str, float], Any] = {}


def _client(engine: str, timeout_s: float) -> Any:
    if (engine, timeout_s) not in _CLIENTS:
        _CLIENTS[engine, timeout_s] = docker.DockerClient(base_url=engine, timeout=timeout_s)
    return _CLIENTS[engine, timeout_s]


def container_name(cluster: str, task_key: str, executor_id: str) -> str:
    """One executor's container name (a restarted executor replaces its container)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{cluster}-ex-{task_key}-{executor_id}")[:200]


class ContainerProcess:
    """An executor container: what `ManagedExecutor` needs of a process group."""

    pid = None
    """Its pids are the container's, not the task manager's."""

    def __init__(self, client: Any, container_id: str, name: str, timeout_s: float) -> None:
        self.client = client
        self.container_id = container_id
        self.name = name
        self.timeout_s = timeout_s

    @classmethod
    def spawn(
        cls,
        config: ExecutorContainers,
        node: str,
        task_key: str,
        executor_id: str,
        command: Sequence[str],
        env: dict[str, str],
        log_path: Path,
    ) -> ContainerProcess:
        """Start the executor's container on `node` (replacing one of the same name); output to `log_path`."""
        spec = config.node(node)
        client = _client(spec.engine, config.engine_timeout_s)
        name = container_name(config.cluster, task_key, executor_id)
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True)
        # The log file is on a bind mount (the task manager's log dir), so the task manager and
        # `cornserve logs` read it as they read a local executor's.
        shell = f"exec {shlex.join(command)} >>{shlex.quote(str(log_path))} 2>&1"
        passed = {k: v for k, v in env.items() if k.startswith(("CORNSERVE_", "OTEL_", "HF_"))}
        container = client.containers.run(
            config.image,
            ["sh", "-c", shell],
            name=name,
            detach=True,
            ipc_mode=f"container:{spec.ipc_container}",
            network_mode="host",
            labels={
                LABEL_CLUSTER: config.cluster,
                LABEL_NODE: node,
                LABEL_ROLE: "executor",
                LABEL_TASK_KEY: task_key,
            },
            environment={**passed, **config.env},
            volumes={str(p): {"bind": str(p), "mode": "rw"} for p in {*config.mounts, log_path.parent}},
            user=config.user,
        )
        return cls(client, str(container.id), name, config.engine_timeout_s)

    def exit_code(self) -> int | None:
        """None while running; its exit code once stopped; -1 when it or its engine is gone."""
        try:
            state = self.client.containers.get(self.container_id).attrs.get("State", {})
        except docker.errors.DockerException:
            return -1
        return None if state.get("Running") else int(state.get("ExitCode", -1))

    def alive(self) -> bool:
        """Whether the container runs."""
        return self.exit_code() is None

    async def stop_async(self, grace_s: float) -> int | None:
        """SIGTERM, SIGKILL after `grace_s`, then remove the container; its exit code."""

        def stop() -> int | None:
            try:
                c = self.client.containers.get(self.container_id)
                c.stop(timeout=max(1, int(grace_s)))
                c.reload()
                code = c.attrs.get("State", {}).get("ExitCode")
                c.remove(force=True)
                return None if code is None else int(code)
            except docker.errors.NotFound:
                return None
            except docker.errors.DockerException as exc:
                logger.warning("cannot stop executor container %s: %s", self.name, exc)
                return None

        return await asyncio.wait_for(asyncio.to_thread(stop), grace_s + 2 * self.timeout_s)
