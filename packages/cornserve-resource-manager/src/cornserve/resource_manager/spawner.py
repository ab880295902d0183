"""How task-manager processes come to exist: a `Spawner` interface and the local-subprocess spawner.

The `kubernetes` spawner (`k8s_spawner.py`: task managers as pods) is another one behind the same
interface (with the `NodeSpawner` methods); the resource manager only needs to start a task manager, know whether it is still alive,
read its log's tail, kill it, and list the task managers it started (so that reconciliation finds
orphans and duplicates).

Task managers outlive the resource manager on purpose (a restarted one adopts them), so the local
spawner records each one it starts or adopts in a directory of process records
(`cornserve.runtime.detached`); `cornserve up` stops the recorded ones at a full shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from cornserve.bus.control import DeviceInfo, TaskSpec
from cornserve.runtime.detached import DetachedGroups
from cornserve.runtime.metrics import child_environment
from cornserve.runtime.process import ProcessGroup
from cornserve.runtime.settings import NATS_CREDS_ENV

TASK_MANAGER_NATS_CREDS_ENV = "CORNSERVE_TASK_MANAGER_NATS_CREDS"
"""The resource manager's setting naming the task managers' credentials file."""

logger = logging.getLogger(__name__)


class TaskManagerHandle(Protocol):
    """A running (or exited) task-manager process."""

    @property
    def pid(self) -> int | None:
        """Process id, where the spawner has one."""

    def exit_code(self) -> int | None:
        """None while alive; the exit code (or -1 when unknown) once it is gone."""

    def log_tail(self, max_chars: int = 2000) -> str:
        """The end of its log, for error messages."""

    async def kill(self, grace_s: float) -> None:
        """SIGTERM its process group, SIGKILL after `grace_s`; returns once it is gone."""


class Spawner(Protocol):
    """Starts task managers and re-attaches to ones that survived a resource-manager restart."""

    async def spawn(self, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """Start a task manager for `task`."""

    def adopt(self, task_key: str, pid: int | None) -> TaskManagerHandle:
        """A handle to a task manager started by an earlier resource-manager process."""

    def running(self) -> list[tuple[str, TaskManagerHandle]]:
        """(task key, handle) of every task manager this spawner knows to be running, wanted or not."""


@runtime_checkable
class NodeSpawner(Protocol):
    """Optional, for backends that span nodes (docker, kubernetes): what they add to `Spawner`.

    A spawner without these methods is one node (the local spawner): the resource manager then
    discovers this machine's devices, never sees a node down, and spawns with `Spawner.spawn`.
    Use the functions below (`spawner_devices`, `unavailable_nodes`, `spawn_on_node`), which fall
    back to those defaults, rather than calling the methods directly.
    """

    def node_devices(self) -> list[DeviceInfo]:
        """Every node's devices (kind, index, memory, sidecar rank, node); ranks unique cluster-wide."""

    async def unavailable_nodes(self) -> set[str]:
        """Nodes whose devices cannot be used now (engine unreachable, node agent stopped)."""

    async def spawn_on(self, node: str, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """Start a task manager on `node` (its executors run on that node)."""

    def pids_are_local(self) -> bool:
        """Whether the pids handles and task managers report are this machine's (signals may be sent)."""

    def one_node_per_deployment(self) -> bool:
        """Whether every executor of a deployment must be on its task manager's node."""


@runtime_checkable
class NodeAgents(Protocol):
    """Optional: a backend with work to do before its inventory is read and it serves.

    The docker spawner starts per-node agents (sidecars, shared memory); the kubernetes spawner
    learns its nodes (their sidecars are a DaemonSet's).
    """

    async def start(self) -> None:
        """Start what each node needs (a node that cannot be started is left down, and logged)."""


def spawner_devices(spawner: object, discover: Callable[[], list[DeviceInfo]]) -> list[DeviceInfo]:
    """The inventory: every node's devices from the backend, or `discover()` (this machine) for a one-node spawner."""
    if isinstance(spawner, NodeSpawner):
        return spawner.node_devices()
    return discover()


async def unavailable_nodes(spawner: object) -> set[str]:
    """Nodes that are down now (never any for a one-node spawner)."""
    if isinstance(spawner, NodeSpawner):
        return await spawner.unavailable_nodes()
    return set()


async def spawn_on_node(
    spawner: Spawner, node: str, task_key: str, task: TaskSpec, nats_url: str
) -> TaskManagerHandle:
    """Start a task manager where its executors' devices are (`spawn` for a one-node spawner)."""
    if isinstance(spawner, NodeSpawner):
        return await spawner.spawn_on(node, task_key, task, nats_url)
    return await spawner.spawn(task_key, task, nats_url)


def one_node_per_deployment(spawner: object) -> bool:
    """Whether a deployment's executors must share one node (a one-node spawner: trivially, yes)."""
    return spawner.one_node_per_deployment() if isinstance(spawner, NodeSpawner) else True


def pids_are_local(spawner: object) -> bool:
    """Whether reported pids are this machine's (true for a one-node spawner, the local one)."""
    return spawner.pids_are_local() if isinstance(spawner, NodeSpawner) else True


class TaskManagerProcess(ProcessGroup):
    """A task manager in its own process group: spawned here, or adopted from an earlier resource manager."""

    records: DetachedGroups | None = None
    task_key: str = ""

    async def kill(self, grace_s: float) -> None:
        """SIGTERM its process group, SIGKILL after `grace_s`; its record is dropped once it is gone."""
        await self.stop_async(grace_s)
        if self.records is not None:
            self.records.forget(self.task_key, self.pid)


class PidlessTaskManager:
    """A stored deployment whose task manager pid was never recorded: nothing to watch or kill."""

    pid = None

    def exit_code(self) -> int | None:
        """Unknown, so treated as running (its status answers decide)."""
        return None

    def log_tail(self, max_chars: int = 2000) -> str:
        """No log is known."""
        return ""

    async def kill(self, grace_s: float) -> None:
        """Nothing to signal."""


class LocalSubprocessSpawner:
    """`python -m cornserve.task_manager.main` as a child process in its own process group."""

    def __init__(
        self,
        log_dir: Path,
        log_level: str = "INFO",
        nats_creds: Path | None = None,
        records_dir: Path | None = None,
        metrics: bool = False,
    ) -> None:
        self.log_dir = log_dir
        self.metrics = metrics
        """Give each task manager a metrics port (any free one; it reports the URL in its status)."""
        self.log_level = log_level
        self.nats_creds = nats_creds
        """The task-manager role's NATS credentials file (never the resource manager's own)."""
        self.records = DetachedGroups(records_dir if records_dir is not None else log_dir / "task-managers")
        """One process record per task manager started or adopted (read by `cornserve up` to stop them)."""

    def log_path(self, task_key: str) -> Path:
        """Where a task manager's stdout/stderr go (executor logs sit next to it)."""
        return self.log_dir / f"tm-{task_key}.log"

    async def spawn(self, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """Start the task manager; it answers on its subjects once it has loaded the task."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(task_key)
        command = [
            sys.executable, "-m", "cornserve.task_manager.main",
            "--task-key", task_key,
            "--task-json", json.dumps(task, separators=(",", ":")),
            "--nats-url", nats_url,
            "--log-dir", str(self.log_dir),
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.metrics:
            command += ["--metrics-port", "0"]
        # Not tied to this process's life: a restarted resource manager adopts the task managers.
        proc = TaskManagerProcess.spawn(
            command,
            log_path=log_path,
            env=task_manager_env(dict(os.environ), self.nats_creds),
            die_with_parent=False,
        )
        self._recorded(task_key, proc)
        logger.info("spawned task manager for %s (pid %d, log %s)", task_key, proc.pid, log_path)
        return proc

    def adopt(self, task_key: str, pid: int | None) -> TaskManagerHandle:
        """Handle to a surviving task manager (recorded, if an earlier version did not record it)."""
        if pid is None:
            return PidlessTaskManager()
        proc = TaskManagerProcess.adopt(pid, self.log_path(task_key))
        if proc.alive():
            self._recorded(task_key, proc)
        else:
            proc.records, proc.task_key = self.records, task_key
        return proc

    def running(self) -> list[tuple[str, TaskManagerHandle]]:
        """The recorded task managers still running (stale records, of exited ones, are dropped)."""
        found: list[tuple[str, TaskManagerHandle]] = []
        for rec in self.records.records():
            if not rec.alive():
                self.records.forget(rec.name, rec.pid)
                continue
            proc = TaskManagerProcess.adopt(rec.pid, self.log_path(rec.name))
            proc.records, proc.task_key = self.records, rec.name
            found.append((rec.name, proc))
        return found

    def _recorded(self, task_key: str, proc: TaskManagerProcess) -> None:
        proc.records, proc.task_key = self.records, task_key
        try:
            self.records.record(task_key, proc.pid)
        except OSError as exc:  # the task manager runs; only a full shutdown would miss it
            logger.error("cannot record task manager %s (pid %d): %s", task_key, proc.pid, exc)


def task_manager_env(base: dict[str, str], nats_creds: Path | None) -> dict[str, str]:
    """A task manager's environment: this process's, with the task-manager role's NATS credentials.

    Variables are inherited, so the resource manager's own ``CORNSERVE_NATS_CREDS`` would otherwise
    reach the task manager: it is replaced by the task-manager role's file, or removed when there is
    none, and the task-manager-credentials setting itself is not passed on.
    ``CORNSERVE_EXECUTOR_NATS_CREDS`` does pass on: the task manager hands it to its executors.
    """
    env = child_environment(base)  # never this process's metrics port
    env = {k: v for k, v in env.items() if k not in (NATS_CREDS_ENV, TASK_MANAGER_NATS_CREDS_ENV)}
    if nats_creds is not None:
        env[NATS_CREDS_ENV] = str(nats_creds)
    return env
