"""The `docker` spawner: nodes are Docker engines; task managers and node agents are containers.

One engine per node, addressed like ``DOCKER_HOST`` (``unix:///var/run/docker.sock``,
``tcp://10.0.0.5:2376``, ``ssh://user@host``); several nodes may share one engine (containers as
nodes, as the tests do). Every container uses the host's network. Per node the spawner keeps:

- an **IPC holder** (``<cluster>-<node>-ipc``: the node image sleeping, ``--ipc shareable`` with the
  node's ``shm_bytes``): its ``/dev/shm`` is the node's shared memory;
- one **sidecar** container per device (``<cluster>-<node>-sidecar-<rank>``), in the holder's IPC
  namespace, advertising the node's ``address`` for cross-node (TCP) transfers;
- one **task-manager** container per deployment (``<cluster>-tm-<node>-<key>``), on the node of its
  first executor;
- one **executor** container per executor (``<cluster>-ex-<key>-<id>``), started by the task
  manager (`cornserve.task_manager.containers`, from the file this spawner writes,
  ``<log dir>/executor-containers-<cluster>.json``) on the node of the executor's devices, in that
  node's IPC namespace, so it shares the node's ``/dev/shm`` with the node's sidecars. One
  deployment's executors may be on several nodes (replicas spread). The task manager reaches the
  engines through their sockets, bound into its container (a Docker socket is root on its host).

Containers on different nodes never share ``/dev/shm``: forwards between them take the sidecars'
TCP path. A node is *down* when its engine does not answer, or its IPC holder or one of its
sidecars is not running; the resource manager then re-places its deployments (`reconcile`). The
holders and sidecars are started when the spawner starts (kept if already running) and never
restarted by it: a stopped node stays down until an operator (or a new resource manager) starts it
again.

Every Docker call has the client's timeout (`engine_timeout_s`). Starting, stopping and the node
check run in worker threads; the `Spawner` protocol's synchronous methods (a handle's `exit_code`
and `log_tail`, `running`, `adopt`) call the engine directly, one short inspection or listing each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import docker
import docker.errors

from cornserve.bus.control import DeviceInfo, TaskSpec
from cornserve.resource_manager.docker_config import DockerNode, DockerSpawnerConfig
from cornserve.resource_manager.spawner import TaskManagerHandle, task_manager_env

logger = logging.getLogger(__name__)

LABEL_CLUSTER = "org.cornserve.cluster"
LABEL_NODE = "org.cornserve.node"
LABEL_ROLE = "org.cornserve.role"
LABEL_TASK_KEY = "org.cornserve.task-key"


class DockerTaskManager:
    """A task-manager container; `pid` is None (its pids are the container's, not this machine's)."""

    pid = None

    def __init__(
        self, spawner: DockerSpawner, node: str, container_id: str, name: str, task_key: str
    ) -> None:
        self.spawner = spawner
        self.node = node
        self.container_id = container_id
        self.name = name
        self.task_key = task_key

    def _container(self) -> Any:
        return self.spawner.client(self.node).containers.get(self.container_id)

    def exit_code(self) -> int | None:
        """None while the container runs; its exit code once it stopped; -1 when it or its engine is gone."""
        try:
            c = self._container()
        except docker.errors.NotFound:
            return -1
        except docker.errors.DockerException as exc:
            logger.warning(
                "task manager %s: engine of node %s does not answer: %s", self.name, self.node, exc
            )
            return -1
        state = c.attrs.get("State", {})
        if state.get("Running"):
            return None
        return int(state.get("ExitCode", -1))

    def log_tail(self, max_chars: int = 2000) -> str:
        """The end of the container's output."""
        try:
            out: bytes = self._container().logs(tail=200)
        except docker.errors.DockerException as exc:
            return f"<logs of container {self.name} unavailable: {exc}>"
        return out.decode(errors="replace")[-max_chars:]

    async def kill(self, grace_s: float) -> None:
        """Stop the container (SIGTERM, SIGKILL after `grace_s`) and remove it; its executors die with it."""

        def stop() -> None:
            try:
                c = self._container()
                c.stop(timeout=max(1, int(grace_s)))
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.DockerException as exc:
                logger.warning("cannot remove task manager container %s on %s: %s", self.name, self.node, exc)
            # A task manager killed before stopping its executors leaves their containers behind.
            self.spawner.remove_executors(self.task_key)

        await asyncio.wait_for(asyncio.to_thread(stop), grace_s + 2 * self.spawner.config.engine_timeout_s)


class DockerSpawner:
    """`Spawner` and `NodeSpawner` on Docker engines (see the module's docstring)."""

    def __init__(
        self,
        config: DockerSpawnerConfig,
        log_dir: Path,
        log_level: str = "INFO",
        nats_creds: Path | None = None,
        nats_url: str = "",
    ) -> None:
        self.config = config
        self.log_dir = log_dir
        self.log_level = log_level
        self.nats_creds = nats_creds
        self.nats_url = nats_url
        self._clients: dict[str, Any] = {}
        self.nodes = {n.name: n for n in config.nodes}

    # ----- engines and the node agents ------------------------------------------------------------

    def client(self, node: str) -> Any:
        """The Docker client of a node's engine (one per engine URL)."""
        engine = self.nodes[node].engine
        if engine not in self._clients:
            self._clients[engine] = docker.DockerClient(base_url=engine, timeout=self.config.engine_timeout_s)
        return self._clients[engine]

    @cached_property
    def _ranks(self) -> dict[str, list[int]]:
        """Sidecar ranks by node: consecutive, in the order of the config's nodes."""
        ranks: dict[str, list[int]] = {}
        first = 0
        for n in self.config.nodes:
            ranks[n.name] = list(range(first, first + n.devices.count))
            first += n.devices.count
        return ranks

    def node_devices(self) -> list[DeviceInfo]:
        """Every configured node's devices; ranks are unique across the cluster."""
        return [
            DeviceInfo(
                kind=n.devices.kind,
                index=i,
                sidecar_rank=rank,
                node=n.name,
                memory_bytes=n.devices.memory_bytes,
            )
            for n in self.config.nodes
            for i, rank in enumerate(self._ranks[n.name])
        ]

    def _labels(self, node: str, role: str, **extra: str) -> dict[str, str]:
        return {LABEL_CLUSTER: self.config.cluster, LABEL_NODE: node, LABEL_ROLE: role, **extra}

    def _volumes(self) -> dict[str, dict[str, str]]:
        return {str(p): {"bind": str(p), "mode": "rw"} for p in {*self.config.mounts, self.log_dir}}

    def _user(self) -> str:
        return self.config.user or f"{os.getuid()}:{os.getgid()}"

    def _ipc_name(self, node: str) -> str:
        return f"{self.config.cluster}-{node}-ipc"

    def _running(self, node: str, name: str, *, remove_stopped: bool = False) -> Any | None:
        """The running container `name` on `node`, or None (a stopped one is removed if asked)."""
        try:
            c = self.client(node).containers.get(name)
        except docker.errors.NotFound:
            return None
        if c.status == "running":
            return c
        if remove_stopped:
            c.remove(force=True)  # an exited one of an earlier run: replaced
        return None

    def _start_node(self, node: DockerNode) -> None:
        """The node's IPC holder and sidecars, started unless already running."""
        ipc = self._ipc_name(node.name)
        client = self.client(node.name)
        if self._running(node.name, ipc, remove_stopped=True) is None:
            client.containers.run(
                self.config.image,
                ["sleep", "infinity"],
                name=ipc,
                detach=True,
                ipc_mode="shareable",
                shm_size=node.shm_bytes,
                network_mode="host",
                labels=self._labels(node.name, "ipc"),
                user=self._user(),
                healthcheck={"test": ["NONE"]},  # it only holds the namespace
            )
        for index, rank in enumerate(self._ranks[node.name]):
            name = f"{self.config.cluster}-{node.name}-sidecar-{rank}"
            if self._running(node.name, name, remove_stopped=True) is not None:
                continue
            command = [
                "cornserve-sidecar", "--rank", str(rank), "--node", node.name,
                "--nats-url", self.nats_url, "--arena-bytes", str(self.config.arena_bytes),
                "--tcp-host", node.bind_host or node.address, "--advertise-host", node.address,
                "--log-level", self.log_level,
            ]  # fmt: skip
            env = {
                **self.config.env,
                "CORNSERVE_NATS_URL": self.nats_url,
            }  # the image's health check reads it
            if self.config.sidecar_nats_creds is not None:
                env["CORNSERVE_NATS_CREDS"] = str(self.config.sidecar_nats_creds)
            if self.config.sidecar_peer_secret_file is not None:
                command += ["--peer-secret-file", str(self.config.sidecar_peer_secret_file)]
            client.containers.run(
                self.config.image,
                command,
                name=name,
                detach=True,
                ipc_mode=f"container:{ipc}",
                network_mode="host",
                labels=self._labels(node.name, "sidecar", **{"org.cornserve.rank": str(rank)}),
                environment=env,
                volumes=self._volumes(),
                user=self._user(),
                restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
            )
            logger.info("node %s: sidecar rank %d (device %d) started in %s", node.name, rank, index, name)

    @property
    def executor_containers_file(self) -> Path:
        """Where the task managers find how to run executors as containers (in the bound log dir)."""
        return self.log_dir / f"executor-containers-{self.config.cluster}.json"

    def _write_executor_containers(self) -> None:
        nodes = {
            n.name: {"engine": n.engine, "address": n.address, "ipc_container": self._ipc_name(n.name)}
            for n in self.config.nodes
        }
        spec = {
            "cluster": self.config.cluster,
            "image": self.config.image,
            "user": self._user(),
            "mounts": [str(p) for p in {*self.config.mounts, self.log_dir}],
            "env": self.config.env,
            "nodes": nodes,
            "engine_timeout_s": self.config.engine_timeout_s,
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.executor_containers_file.write_text(json.dumps(spec, indent=2))

    def _engine_sockets(self) -> dict[str, dict[str, str]]:
        """The unix sockets of the engines, bound into task-manager containers at the same path."""
        paths = {
            n.engine.removeprefix("unix://") for n in self.config.nodes if n.engine.startswith("unix://")
        }
        return {p: {"bind": p, "mode": "rw"} for p in paths}

    async def start(self) -> None:
        """Start every node's agents; a node whose engine does not answer is logged and left down."""
        self._write_executor_containers()
        for node in self.config.nodes:
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(self._start_node, node), 4 * self.config.engine_timeout_s
                )
            except (docker.errors.DockerException, TimeoutError) as exc:
                logger.error("node %s (engine %s) could not be started: %s", node.name, node.engine, exc)

    async def unavailable_nodes(self) -> set[str]:
        """Nodes whose engine does not answer, or whose IPC holder or one of whose sidecars is not running."""

        def check(node: str) -> bool:
            try:
                running = self.client(node).containers.list(
                    filters={"label": [f"{LABEL_CLUSTER}={self.config.cluster}", f"{LABEL_NODE}={node}"]}
                )
            except docker.errors.DockerException:
                return True
            roles = Counter(c.labels.get(LABEL_ROLE, "") for c in running)
            return roles["ipc"] < 1 or roles["sidecar"] < len(self._ranks[node])

        results = await asyncio.gather(*(asyncio.to_thread(check, n) for n in self.nodes))
        return {n for n, down in zip(self.nodes, results, strict=True) if down}

    def pids_are_local(self) -> bool:
        """Pids in a container are the container's."""
        return False

    def one_node_per_deployment(self) -> bool:
        """Executors are containers on their own nodes: replicas may spread."""
        return False

    # ----- task managers --------------------------------------------------------------------------

    async def spawn(self, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """On the first node (the resource manager calls `spawn_on` with the node of the devices)."""
        return await self.spawn_on(self.config.nodes[0].name, task_key, task, nats_url)

    async def spawn_on(self, node: str, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """A task-manager container on `node`, in the node's IPC namespace, on the host's network."""
        if node not in self.nodes:
            raise ValueError(f"node {node!r} is not one of the docker spawner's nodes {list(self.nodes)}")
        spec = self.nodes[node]
        name = f"{self.config.cluster}-tm-{node}-{_safe(task_key)}"
        command = [
            "python", "-m", "cornserve.task_manager.main",
            "--task-key", task_key,
            "--task-json", json.dumps(task, separators=(",", ":")),
            "--nats-url", nats_url,
            "--log-dir", str(self.log_dir),
            "--log-level", self.log_level,
            "--executor-host", spec.address,
            "--executor-containers", str(self.executor_containers_file),
        ]  # fmt: skip
        env = {k: v for k, v in task_manager_env(dict(os.environ), self.nats_creds).items() if _passed(k)}
        env.update(self.config.env)

        def run() -> Any:
            client = self.client(node)
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(name).remove(force=True)  # a stopped one from before
            return client.containers.run(
                self.config.image,
                command,
                name=name,
                detach=True,
                ipc_mode=f"container:{self._ipc_name(node)}",
                network_mode="host",
                labels=self._labels(node, "task-manager", **{LABEL_TASK_KEY: task_key}),
                environment=env,
                volumes={**self._volumes(), **self._engine_sockets()},
                user=self._user(),
            )

        container = await asyncio.wait_for(asyncio.to_thread(run), 4 * self.config.engine_timeout_s)
        logger.info("spawned task manager for %s on node %s (container %s)", task_key, node, name)
        return DockerTaskManager(self, node, str(container.id), name, task_key)

    def adopt(self, task_key: str, pid: int | None) -> TaskManagerHandle:
        """The running container of `task_key` (on any node), or a handle that reports it gone."""
        for key, handle in self.running():
            if key == task_key:
                return handle
        return DockerTaskManager(
            self, self.config.nodes[0].name, f"missing-{_safe(task_key)}", task_key, task_key
        )

    def running(self) -> list[tuple[str, TaskManagerHandle]]:
        """Every running task-manager container of this cluster, on every engine that answers."""
        found: list[tuple[str, TaskManagerHandle]] = []
        seen: set[str] = set()
        for node in self.nodes:
            if self.nodes[node].engine in seen:
                continue
            seen.add(self.nodes[node].engine)
            try:
                containers = self.client(node).containers.list(
                    filters={
                        "label": [f"{LABEL_CLUSTER}={self.config.cluster}", f"{LABEL_ROLE}=task-manager"]
                    }
                )
            except docker.errors.DockerException as exc:
                logger.warning("cannot list containers of node %s: %s", node, exc)
                continue
            for c in containers:
                key = c.labels.get(LABEL_TASK_KEY, "")
                on = c.labels.get(LABEL_NODE, node)
                found.append((key, DockerTaskManager(self, on, str(c.id), c.name, key)))
        return found

    def remove_executors(self, task_key: str) -> None:
        """Remove the executor containers of `task_key` on every engine that answers (blocking)."""
        for engine, node in {n.engine: n.name for n in self.config.nodes}.items():
            labels = [
                f"{LABEL_CLUSTER}={self.config.cluster}",
                f"{LABEL_ROLE}=executor",
                f"{LABEL_TASK_KEY}={task_key}",
            ]
            try:
                for c in self.client(node).containers.list(all=True, filters={"label": labels}):
                    c.remove(force=True)
            except docker.errors.DockerException as exc:
                logger.warning("cannot remove executor containers of %s on %s: %s", task_key, engine, exc)

    async def remove_all(self, nodes: Sequence[str] | None = None) -> None:
        """Remove every container of this cluster on `nodes` (default: all), e.g. when a cluster stops."""

        def remove(node: str) -> None:
            client = self.client(node)
            for c in client.containers.list(
                all=True,
                filters={"label": [f"{LABEL_CLUSTER}={self.config.cluster}", f"{LABEL_NODE}={node}"]},
            ):
                c.remove(force=True)

        for node in nodes or list(self.nodes):
            await asyncio.wait_for(asyncio.to_thread(remove, node), 4 * self.config.engine_timeout_s)


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key)[:120]


def _passed(name: str) -> bool:
    """Environment variables handed into containers: Cornserve's settings, tracing, Hugging Face."""
    return name.startswith(("CORNSERVE_", "OTEL_", "HF_")) or name in ("TRANSFORMERS_OFFLINE",)
