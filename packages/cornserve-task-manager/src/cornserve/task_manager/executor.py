"""One executor process of a deployed unit task: launch from the descriptor, readiness, health, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker.errors

from cornserve.bus.control import DeviceInfo, ExecutorInfo, ExecutorState
from cornserve.runtime.metrics import child_environment
from cornserve.runtime.process import ProcessGroup, free_ports, log_tail
from cornserve.runtime.settings import NATS_CREDS_ENV, NATS_URL_ENV
from cornserve.task import ExecutorLaunchSpec, ExecutorPlacement, UnitTask
from cornserve.task_manager.containers import ContainerProcess, ExecutorContainers
from cornserve.task_manager.devices import DeviceMapError, executor_devices

EXECUTOR_NATS_CREDS_ENV = "CORNSERVE_EXECUTOR_NATS_CREDS"
"""The task manager's setting naming the executors' credentials file (`TaskManagerSettings`)."""

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0
"""One health probe; a probe slower than this counts as a failure (a loading server, vLLM's among
them, can accept a connection and not answer)."""
PROGRESS_INTERVAL_S = 30.0
"""While an executor starts (vLLM: up to its descriptor's `ready_timeout_s`), the wait is logged this often."""


class ExecutorStartError(RuntimeError):
    """An executor did not become healthy: it exited, timed out, or its descriptor failed."""


@dataclass
class ManagedExecutor:
    """State of one executor; the process is replaced on restart, the id and devices stay."""

    executor_id: str
    devices: list[DeviceInfo]
    log_path: Path
    nats_creds: Path | None = None
    """The executor role's NATS credentials file (never the task manager's own)."""
    host: str = HOST
    """Address the executor listens on and is reached at (its node's routable address across nodes)."""
    containers: ExecutorContainers | None = None
    """Run the executor as a container on its devices' node (the docker spawner); None: a local process."""
    task_key: str = ""
    state: ExecutorState = "starting"
    port: int = 0
    channel_port: int | None = None
    """The executor's invocation channel port (`cornserve.bus.invoke_channel`), when its descriptor serves one."""
    health_path: str = "/health"
    proc: ProcessGroup | ContainerProcess | None = None
    in_flight: int = 0
    routed: int = 0
    restarts: int = 0
    failed_probes: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    next_restart_at: float = 0.0
    ever_ready: bool = False
    """Only executors that were healthy once are restarted automatically (a broken launch is not retried)."""
    start_failures: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        """Base URL of the executor's HTTP server."""
        return f"http://{self.host}:{self.port}"

    @property
    def channel(self) -> str | None:
        """``host:port`` of the executor's invocation channel, or None (it is called over HTTP)."""
        return f"{self.host}:{self.channel_port}" if self.channel_port is not None else None

    @property
    def sidecar_ranks(self) -> list[int]:
        """The sidecar ranks of its devices, in device order."""
        return [d.sidecar_rank for d in self.devices]

    def info(self) -> ExecutorInfo:
        """Wire view of this executor (its fields are read off the attributes of the same names)."""
        return ExecutorInfo.model_validate(self, from_attributes=True)

    def add_in_flight(self, delta: int) -> None:
        """Change the in-flight count, never below zero; `idle` is set whenever it is zero."""
        self.in_flight = max(0, self.in_flight + delta)
        self.last_activity = time.monotonic()
        if self.in_flight == 0:
            self.idle.set()
        else:
            self.idle.clear()

    def exited(self) -> int | None:
        """The exit code if the process has exited, else None."""
        return None if self.proc is None else self.proc.exit_code()

    def launch(self, task: UnitTask[Any, Any], nats_url: str) -> float:
        """Start the process on a fresh port; returns the descriptor's readiness timeout."""
        node = self.devices[0].node if self.devices else ""
        if self.containers is not None:
            self.host = self.containers.node(node).address
        try:  # both drawn at once: two separate draws may return the same port
            port, channel_port = free_ports(2, self.host)
        except OSError:  # another node's address: a port free here is very likely free there
            port, channel_port = free_ports(2)
        try:
            devices = executor_devices(self.devices)
        except DeviceMapError as exc:
            raise ExecutorStartError(f"executor {self.executor_id}: {exc}") from exc
        placement = ExecutorPlacement(
            executor_id=self.executor_id,
            host=self.host,
            port=port,
            devices=devices,
            sidecar_ranks=self.sidecar_ranks,
            nats_url=nats_url,
            channel_port=channel_port,
        )
        try:
            spec: ExecutorLaunchSpec = task.descriptor.launch_spec(task, placement)
        except Exception as exc:
            raise ExecutorStartError(
                f"{type(task.descriptor).__name__}.launch_spec failed for executor {self.executor_id}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        env = executor_env(
            {**os.environ, **placement.cpu_threads_env(), **spec.env}, nats_url, self.nats_creds
        )
        self.port = spec.port
        self.channel_port = spec.channel_port
        self.health_path = spec.health_path if spec.health_path.startswith("/") else "/" + spec.health_path
        self.failed_probes = 0
        logger.info("executor %s: starting %s (port %d)", self.executor_id, spec.command, spec.port)
        if self.containers is not None:
            try:
                self.proc = ContainerProcess.spawn(
                    self.containers, node, self.task_key, self.executor_id, spec.command, env, self.log_path
                )
            except (docker.errors.DockerException, KeyError) as exc:
                raise ExecutorStartError(
                    f"executor {self.executor_id}: cannot start its container on node {node}: {exc}"
                ) from exc
            return spec.ready_timeout_s
        try:
            # Dies with this task manager (Linux), so a SIGKILLed manager leaves no executor holding devices.
            self.proc = ProcessGroup.spawn(
                spec.command, log_path=self.log_path, env=env, die_with_parent=True
            )
        except OSError as exc:
            raise ExecutorStartError(
                f"executor {self.executor_id}: cannot run {spec.command[0]!r}: {exc}"
            ) from exc
        return spec.ready_timeout_s

    async def probe(self, session: aiohttp.ClientSession) -> bool:
        """One health check: HTTP 200 from the health path."""
        try:
            async with session.get(
                self.url + self.health_path, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        """Poll the health path until 200; fail early (with the log's tail) if the process exits."""
        started = time.monotonic()
        deadline = started + timeout_s
        next_report = started + PROGRESS_INTERVAL_S
        while True:
            code = self.exited()
            if code is not None:
                raise ExecutorStartError(
                    f"executor {self.executor_id} exited with code {code} before becoming healthy; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if await self.probe(session):
                return
            now = time.monotonic()
            if now >= next_report:
                logger.info(
                    "executor %s: not healthy at %s%s yet, %.0fs of %.0fs",
                    self.executor_id,
                    self.url,
                    self.health_path,
                    now - started,
                    timeout_s,
                )
                next_report += PROGRESS_INTERVAL_S
            if time.monotonic() >= deadline:
                raise ExecutorStartError(
                    f"executor {self.executor_id} not healthy at {self.url}{self.health_path} within "
                    f"{timeout_s:.1f}s; log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            await asyncio.sleep(0.1)

    async def start(
        self, task: UnitTask[Any, Any], nats_url: str, session: aiohttp.ClientSession, timeout_s: float
    ) -> None:
        """Launch and wait until healthy (within the descriptor's timeout and `timeout_s`)."""
        self.state = "starting"
        ready_timeout = self.launch(task, nats_url)
        try:
            await self.wait_ready(session, min(ready_timeout, timeout_s))
        except BaseException:
            await self.stop(grace_s=2.0)
            raise
        self.state = "ready"
        self.ever_ready = True
        self.start_failures = 0
        self.add_in_flight(-self.in_flight)
        logger.info("executor %s ready at %s (pid %s)", self.executor_id, self.url, self.pid)

    @property
    def pid(self) -> int | None:
        """Process id of the current process while it runs (None before the first start and once it exited)."""
        return self.proc.pid if self.proc is not None and self.proc.alive() else None

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL after the grace period."""
        if self.proc is None:
            return
        code = await self.proc.stop_async(grace_s)
        logger.info("executor %s (pid %s) stopped with code %s", self.executor_id, self.proc.pid, code)


def executor_env(base: dict[str, str], nats_url: str, nats_creds: Path | None) -> dict[str, str]:
    """An executor's environment: this manager's, with the executor role's NATS URL and credentials.

    Variables are inherited, so the manager's own ``CORNSERVE_NATS_CREDS`` would otherwise reach the
    executor (which runs task-library code): it is replaced by the executor role's file, or removed
    when there is none, and the executor-credentials setting itself is not passed on.
    """
    env = {**child_environment(base), NATS_URL_ENV: nats_url}  # never this manager's metrics port
    env.pop(NATS_CREDS_ENV, None)
    env.pop(EXECUTOR_NATS_CREDS_ENV, None)
    if nats_creds is not None:
        env[NATS_CREDS_ENV] = str(nats_creds)
    return env
