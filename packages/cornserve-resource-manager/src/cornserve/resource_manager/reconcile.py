"""Reconciliation: a loop that converges the running task managers to the desired deployments.

The desired state is the resource manager's deployments (recovered from KV_DEPLOYMENTS at start,
changed by deploy, release and scale). Without this loop a task manager that died stayed dead
until someone deployed its key again, while dispatchers answered 503 for every invocation of it.

Every `interval_s` each deployment is checked; a repair takes the key's lock, so it never
interleaves with a deploy, release or scale of that key (a key whose lock is held is skipped):

- **ready**: its task manager process exited, or did not answer `misses_before_recreate` status
  requests in a row: the task manager is re-created with the same executor ids and devices (the
  old process group is killed, its executors are given the task managers' kill grace to exit,
  then a new task manager is spawned and assigned the executors, as deploy does). A task manager
  that answers but does not run every desired executor (a resource manager died between spawning
  it and assigning its executors, or between two steps of a scale) is sent the assignment again.
- **failed** (a re-creation, or the re-spawn after a restart, that failed): tried again with
  exponential backoff (the interval doubled per failure, at most `max_backoff_s`).
- **nodes**: each pass asks the spawner backend which nodes are down (`unavailable_nodes`); a
  ready deployment with devices on a down node is re-created like a dead one, and re-placed by the
  placement rules on a node that is up and allowed (a deployment pinned to the down node fails and
  is retried with backoff until the node is back).
- **orphans**: a running task manager (from the spawner's process records) of a key no deployment
  wants, or a second one of a wanted key, is killed.

Each action is logged once with its reason, and announced as a `DeploymentEvent` (`updated` with
state `deploying` while re-creating, `failed` with the reason if that failed, `ready` once it
serves again), so neither the dispatchers nor `GET /tasks` show a dead deployment as ready.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from functools import partial

from cornserve.bus.control import TaskManagerStatus
from cornserve.bus.micro import BusError, ServiceFault
from cornserve.resource_manager.context import ResourceManagerContext
from cornserve.resource_manager.deployment import Deployment
from cornserve.resource_manager.spawner import pids_are_local, unavailable_nodes
from cornserve.runtime.process import pid_alive, signal_group, wait_for_async

logger = logging.getLogger(__name__)


@dataclass
class Reconciler:
    """The loop and its per-key memory (status misses, failures and backoff)."""

    ctx: ResourceManagerContext
    interval_s: float = 5.0
    """Seconds between passes."""
    misses_before_recreate: int = 3
    """Status requests in a row a live task manager may leave unanswered before it is re-created."""
    max_backoff_s: float = 300.0
    """Longest wait before retrying a deployment whose re-creation failed."""
    _loop: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _checks: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False, repr=False)
    _misses: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _failures: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _not_before: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _paused: bool = field(default=False, init=False, repr=False)

    def start(self) -> None:
        """Run passes in the background, the first one at once."""
        self._loop = asyncio.create_task(self._run(), name="cornserve-reconcile")

    async def stop(self) -> None:
        """Cancel the loop and every check or repair in progress (what they spawned keeps running)."""
        tasks = [t for t in (self._loop, *self._checks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._checks.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception:
                # One broken pass (a bug, a full disk) must not end reconciliation for good.
                logger.exception("reconciliation pass failed; the next one runs in %g s", self.interval_s)
            await asyncio.sleep(self.interval_s)

    async def reconcile_once(self) -> None:
        """Start a check of every deployment not already being checked, then reap orphans.

        Without NATS nothing can be checked or repaired (every task manager would look silent):
        the pass is skipped, and status misses counted before are forgotten.
        """
        if not self.ctx.task_managers.nc.is_connected:
            if not self._paused:
                logger.warning("NATS is unavailable: reconciliation paused until it is back")
            self._paused = True
            self._misses.clear()
            return
        if self._paused:
            logger.info("NATS is back: reconciliation resumed")
            self._paused = False
        await self._refresh_nodes()
        for key in list(self.ctx.deployments):
            if key in self._checks or self.ctx.locks.lock(key).locked():
                continue
            check = asyncio.create_task(self._check(key), name=f"cornserve-reconcile-{key}")
            self._checks[key] = check
            check.add_done_callback(partial(self._check_done, key))
        await self._reap_orphans()

    def _check_done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._checks.get(key) is task:
            del self._checks[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("reconciling %s failed", key, exc_info=exc)

    # ----- one deployment ------------------------------------------------------------------------

    async def _check(self, key: str) -> None:
        dep = self.ctx.deployments.get(key)
        if dep is None:
            self._forget(key)
            return
        if dep.state == "failed":
            if time.monotonic() >= self._not_before.get(key, 0.0):
                await self._repair(dep, f"retrying after: {dep.message}", recreate=True)
            return
        if dep.state != "ready":
            return  # an operation is deploying or tearing it down
        lost = sorted({d.node for d in dep.devices} & self.ctx.inventory.down)
        if lost:
            await self._repair(dep, f"node {', '.join(lost)} is down", recreate=True)
            return
        handle = dep.handle
        code = handle.exit_code() if handle is not None else None
        if handle is not None and code is not None:
            await self._repair(
                dep, f"its task manager (pid {handle.pid}) exited with code {code}", recreate=True
            )
            return
        try:
            status = await self.ctx.task_managers.status(key)
        except BusError as exc:
            if not self.ctx.task_managers.nc.is_connected:
                return  # our own connection dropped: says nothing about the task manager
            misses = self._misses[key] = self._misses.get(key, 0) + 1
            if misses == 1:
                logger.warning("task %s: its task manager did not answer a status request: %s", key, exc)
            if misses >= self.misses_before_recreate:
                reason = f"its task manager did not answer {misses} status requests in a row ({exc})"
                await self._repair(dep, reason, recreate=True)
            return
        if self._misses.pop(key, 0):
            logger.info("task %s: its task manager answers again", key)
        dep.status = status
        mismatch = _executor_mismatch(dep, status)
        if mismatch and time.monotonic() >= self._not_before.get(key, 0.0):
            await self._repair(dep, mismatch, recreate=False)

    async def _repair(self, dep: Deployment, reason: str, *, recreate: bool) -> None:
        """Under the key's lock (re-checking nothing changed meanwhile): re-create or re-assign."""
        key = dep.task_key
        async with self.ctx.locks.held(key, self.ctx.lock_timeout_s):
            if self.ctx.deployments.get(key) is not dep or dep.state not in ("ready", "failed"):
                return  # torn down, re-deployed or being changed while we waited: not ours to fix
            if recreate:
                await self._recreate(dep, reason)
                return
            try:  # the executors may have changed while we waited (a scale): look again
                status = await self.ctx.task_managers.status(key)
            except BusError:
                return  # the next pass counts it as a miss
            dep.status = status
            if mismatch := _executor_mismatch(dep, status):
                await self._reassign(dep, mismatch)

    async def _reassign(self, dep: Deployment, reason: str) -> None:
        """Send the desired executor set again: the task manager starts the missing ones."""
        key = dep.task_key
        logger.warning("task %s: %s; assigning its executors again", key, reason)
        deadline = time.monotonic() + self.ctx.recovery_timeout_s
        try:
            dep.status = await self.ctx.task_managers.assign(dep, dep.executors, deadline)
        except ServiceFault as fault:
            self._backoff(key, f"restoring its executors failed: {fault.message}")
            return
        self._failures.pop(key, None)
        self._not_before.pop(key, None)
        await self.ctx.persist_and_announce(dep, "updated")
        logger.info("task %s: executors restored (%s)", key, ", ".join(dep.executors))

    async def _recreate(self, dep: Deployment, reason: str, *, node_retry: bool = True) -> None:
        """Replace the task manager: kill what is left of it, spawn a new one, assign the same executors.

        If the attempt fails and a node of the deployment turned out to be down meanwhile (a node's
        containers stopping one by one), it is re-placed and tried again at once (`node_retry`),
        not after the failure backoff.
        """
        key = dep.task_key
        started = time.monotonic()
        logger.warning("task %s: %s; re-creating its task manager", key, reason)
        dep.state = "deploying"
        dep.message = f"re-creating its task manager: {reason}"
        await self.ctx.announcer.changed("updated", dep.info())
        old = dep.handle
        if old is not None:
            await self.ctx.task_managers.kill(dep)  # a live but silent one would share the key's subjects
        await self._executors_gone(dep)
        # A task manager that died with its node (its containers stopped together) is noticed
        # before the pass's node check would see the node down: look again, so that it is placed
        # on a node that is up rather than re-created where it cannot run.
        await self._refresh_nodes()
        try:
            self._hold_devices(dep)
            deadline = started + self.ctx.recovery_timeout_s
            await self.ctx.task_managers.start(dep, deadline)
            dep.status = await self.ctx.task_managers.assign(dep, dep.executors, deadline)
        except Exception as exc:
            # Typed faults (start or assignment failed, no devices) are expected; anything else (a
            # spawn that raised OSError) is logged with its traceback. Either way the deployment
            # must not stay "deploying", which no pass would ever look at again.
            if isinstance(exc, ServiceFault):
                why = exc.message
            else:
                why = f"{type(exc).__name__}: {exc}"
                logger.error("task %s: re-creating its task manager raised", key, exc_info=exc)
            await self.ctx.task_managers.kill(dep)
            dep.handle = None
            await self._refresh_nodes()
            lost = sorted({d.node for d in dep.devices} & self.ctx.inventory.down)
            if node_retry and lost:
                await self._recreate(
                    dep, f"node {', '.join(lost)} went down while it started ({why})", node_retry=False
                )
                return
            dep.state = "failed"
            dep.message = f"re-creating its task manager failed: {why}"
            await self.ctx.announcer.changed("updated", dep.info())
            self._backoff(key, dep.message)
            return
        dep.state = "ready"
        dep.message = ""
        self._forget(key)
        await self.ctx.persist_and_announce(dep, "ready")
        pid = dep.handle.pid if dep.handle is not None else None
        logger.info(
            "task %s: task manager re-created (pid %s, executors %s) in %.1f s",
            key,
            pid,
            ", ".join(dep.executors),
            time.monotonic() - started,
        )

    def _hold_devices(self, dep: Deployment) -> None:
        """Make sure the inventory holds the deployment's devices (a failed re-spawn may have freed them)."""
        key = dep.task_key
        count = max(1, len(dep.executors))
        if dep.executors and not self.ctx.inventory.claim(key, dep.devices):
            return
        self.ctx.inventory.release(key)
        # Re-placed by the placement rules (a typed 503 if no allowed node has devices), e.g. on
        # another node when the one it ran on is down.
        placed = self.ctx.place_executors(key, dep.task, count, dep.users)
        ids = list(dep.executors) or [dep.new_executor_id()]
        old_nodes = sorted({d.node for d in dep.devices})
        dep.executors = dict(zip(ids, placed, strict=True))
        new_nodes = sorted({d.node for d in dep.devices})
        if old_nodes != new_nodes:
            logger.warning("task %s: re-placed from node(s) %s to %s", key, old_nodes, new_nodes)

    async def _executors_gone(self, dep: Deployment) -> None:
        """Wait (bounded) for the dead task manager's executors to exit, then kill what is left.

        They get SIGTERM when their task manager dies and may still be draining; new executors on
        the same devices must not start next to them (a GPU's memory would not fit both).
        """
        if dep.status is None or not pids_are_local(self.ctx.task_managers.spawner):
            return  # a backend's pids are not this machine's: killing its task manager stopped them
        pids = [e.pid for e in dep.status.executors if e.pid is not None]
        grace = self.ctx.task_managers.timeouts.kill_grace_s
        if await wait_for_async(lambda: not any(pid_alive(p) for p in pids), grace, poll_s=0.1):
            return
        for pid in pids:
            if pid_alive(pid):
                logger.warning(
                    "task %s: executor pid %d outlived its task manager by %g s; killing it",
                    dep.task_key,
                    pid,
                    grace,
                )
                signal_group(pid, signal.SIGKILL)

    async def _refresh_nodes(self) -> None:
        """Ask the spawner backend which nodes are down; their deployments are then re-placed.

        Bounded by the interval: a backend that does not answer in time leaves the states as they were.
        """
        spawner = self.ctx.task_managers.spawner
        try:
            down = await asyncio.wait_for(unavailable_nodes(spawner), max(1.0, self.interval_s))
        except TimeoutError:
            logger.warning("the spawner backend did not say which nodes are up within %g s", self.interval_s)
            return
        went_down, came_up = self.ctx.inventory.set_down(down)
        for node in sorted(went_down):
            logger.warning("node %s is down: its deployments are re-placed on other allowed nodes", node)
        for node in sorted(came_up):
            logger.info("node %s is up again: its devices can be allocated", node)

    def _backoff(self, key: str, why: str) -> None:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        wait = min(self.max_backoff_s, self.interval_s * 2**failures)
        self._not_before[key] = time.monotonic() + wait
        logger.error("task %s: %s; trying again in %.0f s", key, why, wait)

    def _forget(self, key: str) -> None:
        self._misses.pop(key, None)
        self._failures.pop(key, None)
        self._not_before.pop(key, None)

    # ----- orphans -------------------------------------------------------------------------------

    async def _reap_orphans(self) -> None:
        """Kill running task managers no deployment wants (or a second one of a wanted key)."""
        grace = self.ctx.task_managers.timeouts.kill_grace_s
        for key, handle in self.ctx.task_managers.spawner.running():
            if self.ctx.locks.lock(key).locked():
                continue  # a deploy, release or repair of the key is under way
            dep = self.ctx.deployments.get(key)
            current = None if dep is None or dep.handle is None else dep.handle.pid
            if dep is None:
                reason = "no deployment wants it"
            elif current is not None and handle.pid != current:
                reason = f"the deployment's task manager is pid {current}"
            else:
                continue
            logger.warning("reaping orphan task manager of %s (pid %s): %s", key, handle.pid, reason)
            await handle.kill(grace)


def _executor_mismatch(dep: Deployment, status: TaskManagerStatus) -> str:
    """Why the task manager's executors differ from the desired ones ("" when they match)."""
    reported = {e.executor_id for e in status.executors}
    missing = [e for e in dep.executors if e not in reported]
    extra = sorted(reported - set(dep.executors))
    parts = []
    if missing:
        parts.append(f"its task manager does not run executor(s) {', '.join(missing)}")
    if extra:
        parts.append(f"its task manager runs executor(s) {', '.join(extra)} that are not assigned")
    return "; ".join(parts)
