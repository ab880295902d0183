"""The task manager's logic: the desired executor set, health checks and restarts, routing.

It is transport-free (the NATS wiring is in `service`), so every decision here is a plain method:
`assign` converges the running executors to the set the resource manager wants, `route` picks the
least-loaded healthy executor, `done` releases a routed slot, and a background loop restarts
executors whose process died or whose health checks keep failing. Dispatchers mostly route from the
published table of ready executors (`table_entries`, `table.py`) and report what they have
outstanding (`usage`), which counts in every executor's in-flight number and holds a drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cornserve.bus.control import (
    AssignRequest,
    RouteReply,
    RouteRequest,
    TableEntry,
    TaskManagerStatus,
    TaskManagerStatusRequest,
)
from cornserve.bus.micro import ServiceFault
from cornserve.runtime.tracing import set_attributes
from cornserve.task import UnitTask
from cornserve.task_manager.containers import ExecutorContainers
from cornserve.task_manager.executor import ExecutorStartError, ManagedExecutor
from cornserve.task_manager.usage import RemoteUsage

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class TaskManager:
    """Executors of one deployed unit task."""

    task_key: str
    task: UnitTask[Any, Any]
    nats_url: str
    log_dir: Path
    _: KW_ONLY
    executor_nats_creds: Path | None = None
    """NATS credentials file handed to executors (their role's, not this manager's)."""
    metrics_url: str | None = None
    """This process's metrics page, reported in every status (None: no metrics port)."""
    executor_host: str = "127.0.0.1"
    """Address executors listen on and are routed to (a node's routable address across nodes)."""
    executor_containers: ExecutorContainers | None = None
    """Run executors as containers on their devices' nodes (the docker spawner's file); None: local processes."""
    # Health: probing, restarting, and forgetting in-flight work whose done messages were lost.
    _health: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    health_interval_s: float = 1.0
    """Seconds between health-check rounds."""
    unhealthy_after: int = 3
    """Failed probes in a row after which a ready executor is restarted."""
    restart_timeout_s: float = 600.0
    """The readiness deadline of an executor restarted by the health loop."""
    inflight_stale_s: float = 900.0
    """In-flight work with no activity for this long is assumed lost (its done messages never came)."""
    _restarting: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False, repr=False)
    # Assignment: removed executors drain, then stop.
    stop_grace_s: float = 5.0
    """SIGTERM to SIGKILL of an executor's process group."""
    drain_timeout_s: float = 60.0
    """How long a removed executor may finish its in-flight work before it is stopped anyway."""
    executors: dict[str, ManagedExecutor] = field(default_factory=dict, init=False)
    usage: RemoteUsage = field(default_factory=RemoteUsage, init=False)
    """Invocations dispatchers routed from the published table and have not finished."""
    publish_table: Callable[[], tuple[str, int]] | None = field(default=None, init=False, repr=False)
    """Publish the ready set now; returns the table's (instance, version). Set by the NATS wiring."""
    drain_settle_s: float = 0.2
    """A drain waits at least this long, so a report a replica sent before the new table arrived is in."""
    _assign_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the HTTP client and start the health loop."""
        self._session = aiohttp.ClientSession()
        self._health = asyncio.create_task(self._health_loop())

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP client used for health probes."""
        assert self._session is not None, "TaskManager.start() not called"
        return self._session

    async def close(self) -> None:
        """Stop health checks and every executor (SIGTERM, then SIGKILL after the grace period)."""
        if self._closed:
            return
        self._closed = True
        background = [t for t in (self._health, *self._restarting.values()) if t is not None]
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        executors = list(self.executors.values())
        await asyncio.gather(*(ex.stop(self.stop_grace_s) for ex in executors))
        for ex in executors:
            ex.state = "stopped"
        if self._session is not None:
            await self._session.close()

    def load(self) -> dict[str, int]:
        """Executors by readiness, their in-flight calls and restarts (the `data` of the micro STATS)."""
        executors = list(self.executors.values())
        return {
            "executors": len(executors),
            "ready": sum(ex.state == "ready" for ex in executors),
            "in_flight": sum(self.in_flight(ex) for ex in executors),
            "routed": sum(ex.routed for ex in executors),
            "restarts": sum(ex.restarts for ex in executors),
        }

    # ------------------------------------------------------------------ requests

    async def status(self, req: TaskManagerStatusRequest) -> TaskManagerStatus:
        """Every executor and whether all of them are ready."""
        return self._status(req.request_id)

    def in_flight(self, ex: ManagedExecutor) -> int:
        """Invocations on `ex`: routed here (`route`) and routed by dispatchers from the table."""
        return ex.in_flight + self.usage.outstanding(ex.executor_id)

    def count_table_routes(self, routed: dict[str, int]) -> None:
        """Add invocations dispatchers routed from the table (reported in their usage) to the counters."""
        for executor_id, count in routed.items():
            ex = self.executors.get(executor_id)
            if ex is not None:
                ex.routed += count

    def table_entries(self) -> list[TableEntry]:
        """The routable executors: ready ones, by id, less local processes that exited.

        Checked every 50 ms (`table.py`): a local process's exit is a cheap poll, a container's an
        engine call, so containers are left to the health loop (each second).
        """
        return [
            TableEntry(
                executor_id=ex.executor_id, url=ex.url, sidecar_ranks=ex.sidecar_ranks, channel=ex.channel
            )
            for ex in sorted(self.executors.values(), key=lambda e: e.executor_id)
            if ex.state == "ready" and (ex.containers is not None or ex.exited() is None)
        ]

    def _status(self, request_id: str) -> TaskManagerStatus:
        infos = [
            ex.info().model_copy(update={"in_flight": self.in_flight(ex)}) for ex in self.executors.values()
        ]
        ready = bool(infos) and all(i.state == "ready" for i in infos)
        return TaskManagerStatus(
            request_id=request_id,
            task_key=self.task_key,
            ready=ready,
            executors=infos,
            pid=os.getpid(),
            metrics_url=self.metrics_url,
        )

    async def assign(self, req: AssignRequest) -> TaskManagerStatus:
        """Converge to the desired executor set; replies once every desired executor is ready."""
        ids = [a.executor_id for a in req.executors]
        if len(set(ids)) != len(ids):
            raise ServiceFault(400, "bad_request", f"duplicate executor ids in assignment: {ids}")
        try:
            async with asyncio.timeout(req.timeout_s):
                async with self._assign_lock:
                    await self._converge(req)
        except TimeoutError:
            for ex in self.executors.values():
                if ex.state == "starting":
                    ex.state = "failed"
            raise ServiceFault(
                504,
                "assign_timeout",
                f"task {self.task_key}: executors not ready within {req.timeout_s:.1f}s ({self._states()})",
            ) from None
        return self._status(req.request_id)

    async def _converge(self, req: AssignRequest) -> None:
        desired = {a.executor_id: a for a in req.executors}
        removed = [
            ex
            for eid, ex in self.executors.items()
            if eid not in desired or ex.devices != desired[eid].devices
        ]
        # Drain first: an executor that keeps its id but moves devices must release the old ones.
        await asyncio.gather(*(self._drain_and_stop(ex) for ex in removed))
        for ex in removed:
            self.executors.pop(ex.executor_id, None)
        new: list[ManagedExecutor] = []
        for a in req.executors:
            existing = self.executors.get(a.executor_id)
            if existing is not None and existing.state != "failed":
                continue
            if existing is not None:
                await self._cancel_restart(existing.executor_id)
                await existing.stop(self.stop_grace_s)
            ex = ManagedExecutor(
                executor_id=a.executor_id,
                devices=list(a.devices),
                log_path=self.log_dir / f"{self.task_key}.{a.executor_id}.log",
                nats_creds=self.executor_nats_creds,
                host=self.executor_host,
                containers=self.executor_containers,
                task_key=self.task_key,
            )
            self.executors[a.executor_id] = ex
            new.append(ex)
        results = await asyncio.gather(
            *(ex.start(self.task, self.nats_url, self.session, req.timeout_s) for ex in new),
            return_exceptions=True,
        )
        errors: list[str] = []
        for ex, result in zip(new, results, strict=True):
            if isinstance(result, ExecutorStartError):
                ex.state = "failed"
                errors.append(str(result))
            elif isinstance(result, BaseException):
                ex.state = "failed"
                raise result
        if errors:
            for e in errors:
                logger.error("task %s: %s", self.task_key, e)
            raise ServiceFault(502, "executor_failed", "\n".join(errors))

    async def _drain_and_stop(self, ex: ManagedExecutor) -> None:
        """No new routes; wait for in-flight work to finish (bounded), then stop the process."""
        await self._cancel_restart(ex.executor_id)
        ex.state = "draining"
        logger.info("executor %s draining (%d in flight)", ex.executor_id, self.in_flight(ex))
        try:
            async with asyncio.timeout(self.drain_timeout_s):
                await self._drained(ex)
        except TimeoutError:
            logger.warning(
                "executor %s still had %d in flight after %.1fs of draining; stopping it anyway",
                ex.executor_id,
                self.in_flight(ex),
                self.drain_timeout_s,
            )
        await ex.stop(self.stop_grace_s)
        ex.state = "stopped"

    async def _drained(self, ex: ManagedExecutor) -> None:
        """Until nothing routed to `ex` is outstanding and no dispatcher can still pick it from a table."""
        if self.publish_table is None:
            if ex.in_flight > 0:
                await ex.idle.wait()
            return
        instance, version = self.publish_table()  # the table without it, at once
        await asyncio.sleep(self.drain_settle_s)
        while ex.in_flight > 0 or not self.usage.released(ex.executor_id, instance, version):
            await asyncio.sleep(0.02)

    async def route(self, req: RouteRequest) -> RouteReply:
        """The healthy executor with the fewest invocations in flight (ties: fewest routed so far)."""
        ready: list[ManagedExecutor] = []
        for ex in self.executors.values():
            if ex.state != "ready":
                continue
            code = ex.exited()
            if code is not None and ex.executor_id not in self._restarting:
                # Do not wait for the next health round to notice: never route to a dead process.
                self._restart(ex, f"process exited with code {code}")
                continue
            ready.append(ex)
        if not ready:
            raise ServiceFault(
                503,
                "no_healthy_executor",
                f"task {self.task_key} has no healthy executor ({self._states() or 'no executors assigned'})",
                states={eid: ex.state for eid, ex in self.executors.items()},
            )
        best = min(ready, key=lambda ex: (self.in_flight(ex), ex.routed))
        best.routed += 1
        best.add_in_flight(1)
        set_attributes(
            {
                "cornserve.deployment_key": self.task_key,
                "cornserve.executor_id": best.executor_id,
                "cornserve.executors_ready": len(ready),
            }
        )
        return RouteReply(
            request_id=req.request_id,
            executor_id=best.executor_id,
            url=best.url,
            sidecar_ranks=best.sidecar_ranks,
            channel=best.channel,
        )

    def done(self, executor_id: str) -> None:
        """A routed invocation finished (a stale id, e.g. of a removed executor, is ignored)."""
        ex = self.executors.get(executor_id)
        if ex is None:
            logger.debug("done for unknown executor %s ignored", executor_id)
            return
        ex.add_in_flight(-1)

    def _states(self) -> str:
        return ", ".join(f"{eid}: {ex.state}" for eid, ex in self.executors.items())

    # ------------------------------------------------------------------ health

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:
                logger.exception("health check round failed")

    async def check_health(self) -> None:
        """One round: restart executors that exited or failed `unhealthy_after` probes in a row."""
        now = time.monotonic()
        probing: list[ManagedExecutor] = []
        for ex in list(self.executors.values()):
            if ex.executor_id in self._restarting:
                continue
            if ex.state == "ready":
                code = ex.exited()
                if code is not None:
                    self._restart(ex, f"process exited with code {code}")
                    continue
                probing.append(ex)
                if ex.in_flight > 0 and now - ex.last_activity > self.inflight_stale_s:
                    logger.warning(
                        "executor %s: %d in flight with no activity for %.0fs (lost done messages?); resetting",
                        ex.executor_id,
                        ex.in_flight,
                        now - ex.last_activity,
                    )
                    ex.add_in_flight(-ex.in_flight)
            elif ex.state == "failed" and ex.ever_ready and now >= ex.next_restart_at:
                self._restart(ex, "retrying after a failed restart")
        results = await asyncio.gather(*(ex.probe(self.session) for ex in probing))
        for ex, ok in zip(probing, results, strict=True):
            if ex.state != "ready" or ex.executor_id in self._restarting:
                continue
            if ok:
                ex.failed_probes = 0
                continue
            ex.failed_probes += 1
            if ex.failed_probes >= self.unhealthy_after:
                self._restart(ex, f"{ex.failed_probes} health checks of {ex.url}{ex.health_path} failed")

    def _restart(self, ex: ManagedExecutor, reason: str) -> None:
        ex.state = "unhealthy"
        logger.warning("executor %s unhealthy: %s; restarting it", ex.executor_id, reason)
        task = asyncio.create_task(self._do_restart(ex))
        self._restarting[ex.executor_id] = task
        task.add_done_callback(lambda t: self._forget_restart(ex.executor_id, t))

    def _forget_restart(self, executor_id: str, task: asyncio.Task[None]) -> None:
        if self._restarting.get(executor_id) is task:
            del self._restarting[executor_id]
        if not task.cancelled() and task.exception() is not None:
            logger.error("restart of executor %s crashed", executor_id, exc_info=task.exception())

    async def _do_restart(self, ex: ManagedExecutor) -> None:
        ex.state = "restarting"
        await ex.stop(grace_s=2.0)
        ex.add_in_flight(-ex.in_flight)  # whatever was in flight died with the process
        ex.restarts += 1
        try:
            await ex.start(self.task, self.nats_url, self.session, self.restart_timeout_s)
        except ExecutorStartError as exc:
            ex.start_failures += 1
            backoff = min(30.0, 2.0**ex.start_failures)
            ex.state = "failed"
            ex.next_restart_at = time.monotonic() + backoff
            logger.error("executor %s restart failed (retry in %.0fs): %s", ex.executor_id, backoff, exc)
            return
        logger.info("executor %s restarted (%d restarts so far)", ex.executor_id, ex.restarts)

    async def _cancel_restart(self, executor_id: str) -> None:
        task = self._restarting.pop(executor_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
