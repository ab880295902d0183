"""The resource manager's logic: deduplicated, reference-counted deployments on a device inventory.

One task manager per distinct `deployment_key`, shared by every owner (app or client session) that
deploys an equal unit task. All changes to one key happen under that key's lock, so concurrent
deploys, releases and scales of a key never interleave; different keys proceed in parallel.
Deployments are stored in KV_DEPLOYMENTS so a restarted resource manager adopts or re-spawns them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from nats.aio.client import Client
from nats.js.kv import KeyValue

from cornserve.bus.control import (
    KV_DEPLOYMENTS,
    RM_EVENTS,
    AssignRequest,
    ClusterState,
    DeploymentEvent,
    DeploymentInfo,
    DeploymentRecord,
    DeployReply,
    DeployRequest,
    DeviceInfo,
    ExecutorAssignment,
    OkReply,
    ProgressEvent,
    ReleaseReply,
    ReleaseRequest,
    ScaleRequest,
    ShutdownRequest,
    StateRequest,
    TaskLibraryRecord,
    TaskManagerStatus,
    TaskManagerStatusRequest,
    rm_progress_subject,
    tm_subject,
)
from cornserve.bus.kv import TaskLibrarySync, kv_all, kv_delete, kv_put, open_bucket
from cornserve.bus.micro import (
    BusError,
    NoResponders,
    RequestTimeout,
    ServiceErrorReply,
    ServiceFault,
    request,
)
from cornserve.resource_manager.deployment import Deployment, executor_id_seq
from cornserve.resource_manager.devices import DeviceInventory
from cornserve.resource_manager.spawner import Spawner
from cornserve.task import TaskRegistryError, UnitTask, deserialize_task, serialize_task
from cornserve.task.library import load_task_library

logger = logging.getLogger(__name__)

ProgressStage = Literal[
    "queued", "allocating", "starting_task_manager", "starting_executors", "ready", "shared", "failed"
]
_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _load_record(record: TaskLibraryRecord) -> None:
    loaded = load_task_library(record.name, record.source)
    logger.info("task library %s (%s) loaded: %s", record.name, record.sha256[:12], loaded.unit_tasks)


class ResourceManager:
    """Devices, deployments and the task managers behind them."""

    def __init__(
        self,
        nc: Client,
        nats_url: str,
        inventory: DeviceInventory,
        spawner: Spawner,
        *,
        tm_start_timeout_s: float = 60.0,
        status_timeout_s: float = 2.0,
        shutdown_timeout_s: float = 15.0,
        kill_grace_s: float = 5.0,
        lock_timeout_s: float = 900.0,
        recovery_timeout_s: float = 600.0,
    ) -> None:
        self.nc = nc
        self.nats_url = nats_url
        self.inventory = inventory
        self.spawner = spawner
        self.tm_start_timeout_s = tm_start_timeout_s
        self.status_timeout_s = status_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.kill_grace_s = kill_grace_s
        self.lock_timeout_s = lock_timeout_s
        self.recovery_timeout_s = recovery_timeout_s
        self.deployments: dict[str, Deployment] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._bg: set[asyncio.Task[None]] = set()
        self._tasklibs = TaskLibrarySync(nc, _load_record)
        self._kv: KeyValue | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the KV bucket, load task libraries, then adopt or re-spawn stored deployments."""
        self._kv = await open_bucket(self.nc, KV_DEPLOYMENTS)
        await self._tasklibs.start()
        await self.recover()

    async def close(self) -> None:
        """Stop every task manager this process runs (records stay, so a restart re-creates them)."""
        for task in list(self._bg):
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        await asyncio.gather(*(self._stop_task_manager(dep) for dep in list(self.deployments.values())))
        await self._tasklibs.stop()

    @property
    def kv(self) -> KeyValue:
        """The deployments bucket (after start)."""
        assert self._kv is not None, "ResourceManager.start() not called"
        return self._kv

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    @asynccontextmanager
    async def _locked(self, key: str, timeout_s: float) -> AsyncIterator[None]:
        lock = self._lock(key)
        try:
            async with asyncio.timeout(timeout_s):
                await lock.acquire()
        except TimeoutError:
            raise ServiceFault(
                504, "busy", f"task {key}: another operation on it did not finish within {timeout_s:.1f}s"
            ) from None
        try:
            yield
        finally:
            lock.release()

    # ------------------------------------------------------------------ helpers

    async def load_task(self, spec: Any) -> UnitTask[Any, Any]:
        """Rebuild a unit task; an unknown class triggers one refresh of the task libraries first."""
        try:
            try:
                return deserialize_task(spec)
            except TaskRegistryError:
                await self._tasklibs.refresh()
                return deserialize_task(spec)
        except Exception as exc:
            raise ServiceFault(400, "bad_task", f"{type(exc).__name__}: {exc}") from exc

    async def _progress(self, request_id: str, key: str, stage: ProgressStage, message: str = "") -> None:
        if not _SUBJECT_TOKEN.match(request_id):
            return  # not a subject token: nobody can be subscribed to its progress subject
        event = ProgressEvent(request_id=request_id, task_key=key, stage=stage, message=message)
        await self.nc.publish(rm_progress_subject(request_id), event.model_dump_json().encode())

    async def _event(self, kind: Literal["ready", "updated", "removed"], info: DeploymentInfo) -> None:
        await self.nc.publish(
            RM_EVENTS, DeploymentEvent(kind=kind, deployment=info).model_dump_json().encode()
        )

    async def _persist(self, dep: Deployment) -> None:
        await kv_put(self.kv, dep.task_key, dep.record())

    def _num_devices(self, task: UnitTask[Any, Any]) -> int:
        try:
            n = int(task.descriptor.num_devices(task))
        except Exception as exc:
            raise ServiceFault(
                400, "bad_task", f"{type(task.descriptor).__name__}.num_devices failed: {exc}"
            ) from exc
        if n < 1:
            raise ServiceFault(400, "bad_task", f"{type(task.descriptor).__name__}.num_devices returned {n}")
        return n

    # ------------------------------------------------------------------ deploy

    async def deploy(self, req: DeployRequest) -> DeployReply:
        """Make every task ready for `req.owner`, deploying each distinct key at most once."""
        deadline = time.monotonic() + req.timeout_s
        tasks: list[UnitTask[Any, Any]] = []
        for i, spec in enumerate(req.tasks):
            try:
                tasks.append(await self.load_task(spec))
            except ServiceFault as fault:
                raise ServiceFault(400, "bad_task", f"tasks[{i}]: {fault.message}") from None
        keys = [t.deployment_key for t in tasks]
        unique = dict(zip(keys, tasks, strict=True))
        for key in unique:
            await self._progress(req.request_id, key, "queued")
        added: list[str] = []
        results = await asyncio.gather(
            *(self._ensure(key, task, req, deadline, added) for key, task in unique.items()),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            # All or nothing for this owner: undo what this request added.
            for key in added:
                await self._drop_owner(key, req.owner)
            faults = [f for f in failures if isinstance(f, ServiceFault)]
            if faults:
                raise faults[0]
            raise failures[0]
        infos = {key: r for key, r in zip(unique, results, strict=True) if isinstance(r, DeploymentInfo)}
        return DeployReply(request_id=req.request_id, deployments=[infos[k] for k in keys])

    async def _ensure(
        self, key: str, task: UnitTask[Any, Any], req: DeployRequest, deadline: float, added: list[str]
    ) -> DeploymentInfo:
        async with self._locked(key, max(0.001, deadline - time.monotonic())):
            dep = self.deployments.get(key)
            if dep is not None and dep.state == "ready" and dep.handle is not None:
                code = dep.handle.exit_code()
                if code is not None:
                    dep.state = "failed"
                    dep.message = f"task manager exited (code {code})"
                    logger.warning("task %s: %s; deploying it again", key, dep.message)
            if dep is not None and dep.state == "ready":
                if req.owner not in dep.users:
                    dep.users.append(req.owner)
                    added.append(key)
                    await self._persist(dep)
                    await self._event("updated", dep.info())
                await self._progress(req.request_id, key, "shared", f"users: {', '.join(dep.users)}")
                return dep.info()
            prior_users: list[str] = []
            if dep is not None:
                # A deployment that failed (e.g. its re-spawn after a restart): start it over.
                prior_users = [u for u in dep.users if u != req.owner]
                await self._discard(dep)
            return await self._deploy_new(key, task, req, deadline, prior_users, added)

    async def _deploy_new(
        self,
        key: str,
        task: UnitTask[Any, Any],
        req: DeployRequest,
        deadline: float,
        prior_users: list[str],
        added: list[str],
    ) -> DeploymentInfo:
        per = self._num_devices(task)
        await self._progress(req.request_id, key, "allocating", f"{per} device(s)")
        try:
            devices = self.inventory.allocate(key, per)
        except ServiceFault as fault:
            await self._progress(req.request_id, key, "failed", fault.message)
            raise
        dep = Deployment(
            task_key=key, spec=serialize_task(task), task=task, users=[*prior_users, req.owner], executors={}
        )
        dep.executors[dep.new_executor_id()] = devices
        self.deployments[key] = dep
        added.append(key)
        try:
            await self._progress(req.request_id, key, "starting_task_manager")
            await self._start_task_manager(dep, deadline)
            await self._progress(
                req.request_id,
                key,
                "starting_executors",
                ", ".join(f"{e}: {len(d)} device(s)" for e, d in dep.executors.items()),
            )
            dep.status = await self._assign(dep, dep.executors, deadline)
            dep.state = "ready"
            await self._persist(dep)
        except BaseException as exc:
            message = exc.message if isinstance(exc, ServiceFault) else f"{type(exc).__name__}: {exc}"
            logger.error("deploying %s failed: %s", key, message)
            await self._discard(dep)
            await self._progress(req.request_id, key, "failed", message)
            if isinstance(exc, ServiceFault | asyncio.CancelledError):
                raise
            raise ServiceFault(502, "deploy_failed", f"task {key}: {message}") from exc
        logger.info("deployed %s for %s on %s", key, req.owner, [d.sidecar_rank for d in dep.devices])
        await self._event("ready", dep.info())
        await self._progress(req.request_id, key, "ready")
        return dep.info()

    async def _start_task_manager(self, dep: Deployment, deadline: float) -> TaskManagerStatus:
        """Spawn the task manager and wait until it answers (or exits, or the deadline passes)."""
        dep.handle = await self.spawner.spawn(dep.task_key, dep.spec, self.nats_url)
        handle = dep.handle
        start_deadline = min(deadline, time.monotonic() + self.tm_start_timeout_s)
        while True:
            code = handle.exit_code()
            if code is not None:
                raise ServiceFault(
                    502,
                    "deploy_failed",
                    f"task manager of {dep.task_key} exited with code {code} before answering; "
                    f"its log ends with:\n{handle.log_tail()}",
                )
            remaining = start_deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceFault(
                    504,
                    "deploy_timeout",
                    f"task manager of {dep.task_key} did not answer within its start deadline; "
                    f"its log ends with:\n{handle.log_tail()}",
                )
            try:
                return await request(
                    self.nc,
                    tm_subject(dep.task_key, "status"),
                    TaskManagerStatusRequest(),
                    TaskManagerStatus,
                    min(1.0, remaining),
                )
            except NoResponders:
                await asyncio.sleep(min(0.1, max(0.0, remaining)))
            except RequestTimeout:
                continue

    async def _assign(
        self, dep: Deployment, executors: dict[str, list[DeviceInfo]], deadline: float
    ) -> TaskManagerStatus:
        """Tell the task manager its desired executor set; returns once they are all ready."""
        remaining = max(0.1, deadline - time.monotonic())
        msg = AssignRequest(
            executors=[ExecutorAssignment(executor_id=e, devices=d) for e, d in executors.items()],
            timeout_s=remaining,
        )
        try:
            # A little slack so the TM's own timeout reply (with executor states) arrives first.
            return await request(
                self.nc, tm_subject(dep.task_key, "assign"), msg, TaskManagerStatus, remaining + 5.0
            )
        except ServiceErrorReply as exc:
            code = 504 if exc.code == "504" else 502
            raise ServiceFault(
                code,
                "deploy_timeout" if code == 504 else "deploy_failed",
                f"task {dep.task_key}: {exc.error.message}",
            ) from None
        except NoResponders:
            tail = dep.handle.log_tail() if dep.handle is not None else ""
            raise ServiceFault(
                502, "deploy_failed", f"task manager of {dep.task_key} is gone; its log ends with:\n{tail}"
            ) from None
        except RequestTimeout:
            raise ServiceFault(
                504, "deploy_timeout", f"task manager of {dep.task_key} did not answer its assignment in time"
            ) from None

    async def _discard(self, dep: Deployment) -> None:
        """Forget a deployment that never became (or no longer is) ready: free devices, kill its TM."""
        self.deployments.pop(dep.task_key, None)
        self.inventory.release(dep.task_key)
        if dep.handle is not None:
            await asyncio.shield(dep.handle.kill(self.kill_grace_s))

    # ------------------------------------------------------------------ release

    async def release(self, req: ReleaseRequest) -> ReleaseReply:
        """Drop the owner everywhere; tear down tasks nobody uses any more."""
        released: list[str] = []
        torn_down: list[str] = []
        for key in [k for k, d in self.deployments.items() if req.owner in d.users]:
            was_torn = await self._drop_owner(key, req.owner)
            if was_torn is None:
                continue
            released.append(key)
            if was_torn:
                torn_down.append(key)
        return ReleaseReply(request_id=req.request_id, released=released, torn_down=torn_down)

    async def _drop_owner(self, key: str, owner: str) -> bool | None:
        """None if the owner did not use the key; else whether the key was torn down."""
        async with self._locked(key, self.lock_timeout_s):
            dep = self.deployments.get(key)
            if dep is None or owner not in dep.users:
                return None
            dep.users.remove(owner)
            if dep.users:
                await self._persist(dep)
                await self._event("updated", dep.info())
                return False
            await self._teardown(dep)
            return True

    async def _teardown(self, dep: Deployment) -> None:
        dep.state = "stopping"
        logger.info("tearing down %s", dep.task_key)
        await self._stop_task_manager(dep)
        self.deployments.pop(dep.task_key, None)
        self.inventory.release(dep.task_key)
        await kv_delete(self.kv, dep.task_key)
        await self._event("removed", dep.info())

    async def _stop_task_manager(self, dep: Deployment) -> None:
        """Ask the TM to stop its executors and exit; kill its process group if it is still there."""
        try:
            await request(
                self.nc,
                tm_subject(dep.task_key, "shutdown"),
                ShutdownRequest(),
                OkReply,
                self.shutdown_timeout_s,
            )
        except BusError as exc:
            logger.warning("task manager of %s did not shut down cleanly: %s", dep.task_key, exc)
        if dep.handle is not None:
            await dep.handle.kill(self.kill_grace_s)

    # ------------------------------------------------------------------ scale

    async def scale(self, req: ScaleRequest) -> DeploymentInfo:
        """Run `num_executors` executors: allocate devices and start executors, or drain and free."""
        if req.task_key not in self.deployments:
            raise ServiceFault(404, "unknown_task", f"no deployed task {req.task_key!r}")
        deadline = time.monotonic() + req.timeout_s
        async with self._locked(req.task_key, req.timeout_s):
            dep = self.deployments.get(req.task_key)
            if dep is None:
                raise ServiceFault(404, "unknown_task", f"task {req.task_key!r} was torn down")
            if dep.state != "ready":
                raise ServiceFault(409, "not_ready", f"task {req.task_key} is {dep.state}: {dep.message}")
            current = dict(dep.executors)
            if req.num_executors == len(current):
                return dep.info()
            added: dict[str, list[DeviceInfo]] = {}
            if req.num_executors > len(current):
                per = self._num_devices(dep.task)
                count = req.num_executors - len(current)
                await self._progress(req.request_id, dep.task_key, "allocating", f"{count * per} device(s)")
                devices = self.inventory.allocate(dep.task_key, count * per)
                for i in range(count):
                    added[dep.new_executor_id()] = devices[i * per : (i + 1) * per]
                desired = {**current, **added}
            else:
                desired = dict(list(current.items())[: req.num_executors])
            await self._progress(req.request_id, dep.task_key, "starting_executors")
            try:
                status = await self._assign(dep, desired, deadline)
            except ServiceFault as fault:
                await self._progress(req.request_id, dep.task_key, "failed", fault.message)
                if added:
                    self.inventory.release(dep.task_key, [d for devs in added.values() for d in devs])
                    await self._restore(dep, current)
                raise
            for eid, devs in current.items():
                if eid not in desired:
                    self.inventory.release(dep.task_key, devs)
            dep.executors = desired
            dep.status = status
            await self._persist(dep)
            await self._event("updated", dep.info())
            await self._progress(req.request_id, dep.task_key, "ready")
            logger.info("scaled %s to %d executor(s)", dep.task_key, len(desired))
            return dep.info()

    async def _restore(self, dep: Deployment, executors: dict[str, list[DeviceInfo]]) -> None:
        """After a failed scale-up, put the task manager back on the previous executor set."""
        try:
            dep.status = await self._assign(dep, executors, time.monotonic() + self.recovery_timeout_s)
        except ServiceFault as fault:
            dep.state = "failed"
            dep.message = f"restoring executors after a failed scale-up failed: {fault.message}"
            logger.error("task %s: %s", dep.task_key, dep.message)

    # ------------------------------------------------------------------ state

    async def state(self, req: StateRequest) -> ClusterState:
        """Every deployment (asking each TM for its executors) and every device."""
        deps = list(self.deployments.values())
        infos = await asyncio.gather(*(self._current_info(dep) for dep in deps))
        return ClusterState(
            request_id=req.request_id, deployments=list(infos), devices=self.inventory.snapshot()
        )

    async def _current_info(self, dep: Deployment) -> DeploymentInfo:
        if dep.state != "ready":
            return dep.info()
        try:
            status = await request(
                self.nc,
                tm_subject(dep.task_key, "status"),
                TaskManagerStatusRequest(),
                TaskManagerStatus,
                self.status_timeout_s,
            )
        except BusError as exc:
            return dep.info(state="failed", message=f"task manager not answering: {exc}")
        dep.status = status
        return dep.info(status)

    # ------------------------------------------------------------------ recovery

    async def recover(self) -> None:
        """Adopt stored deployments whose TM still answers; re-spawn the others in the background."""
        records = await kv_all(self.kv, DeploymentRecord)
        await asyncio.gather(*(self._recover_one(r) for r in records))

    async def _recover_one(self, rec: DeploymentRecord) -> None:
        try:
            await self._recover(rec)
        except Exception as exc:
            # One bad record must not keep the resource manager from serving the others.
            message = exc.message if isinstance(exc, ServiceFault) else f"{type(exc).__name__}: {exc}"
            logger.error("cannot recover deployment %s (record kept): %s", rec.task_key, message)
            self.inventory.release(rec.task_key)
            self.deployments.pop(rec.task_key, None)

    async def _recover(self, rec: DeploymentRecord) -> None:
        key = rec.task_key
        try:
            task = await self.load_task(rec.task)
        except ServiceFault as fault:
            logger.error("cannot recover deployment %s (record kept): %s", key, fault.message)
            return
        if task.deployment_key != key:
            logger.error(
                "deployment record %s holds a task with key %s; ignoring it", key, task.deployment_key
            )
            return
        per = self._num_devices(task)
        dep = Deployment(task_key=key, spec=rec.task, task=task, users=list(rec.users), executors={})
        try:
            status: TaskManagerStatus | None = await request(
                self.nc,
                tm_subject(key, "status"),
                TaskManagerStatusRequest(),
                TaskManagerStatus,
                self.status_timeout_s,
            )
        except BusError:
            status = None
        if status is not None:
            dep.executors = {e.executor_id: list(e.devices) for e in status.executors}
            dep.handle = self.spawner.adopt(key, status.pid or rec.tm_pid)
            dep.status = status
            dep.state = "ready"
            dep.next_seq = max((executor_id_seq(e) for e in dep.executors), default=-1) + 1
            conflicts = self.inventory.claim(key, dep.devices)
            if conflicts:
                logger.error("adopted %s uses devices not in this inventory or taken: %s", key, conflicts)
            self.deployments[key] = dep
            await self._persist(dep)
            logger.info(
                "adopted running task manager of %s (pid %s, users %s)", key, dep.handle.pid, dep.users
            )
            return
        if rec.tm_pid is not None:
            # A TM that exists but does not answer would fight the new one over the key's subjects.
            await self.spawner.adopt(key, rec.tm_pid).kill(self.kill_grace_s)
        devices = list(rec.devices)
        if self.inventory.claim(key, devices) or len(devices) != per * rec.num_executors:
            self.inventory.release(key)
            devices = self.inventory.allocate(key, per * rec.num_executors)
        for i in range(rec.num_executors):
            dep.executors[dep.new_executor_id()] = devices[i * per : (i + 1) * per]
        self.deployments[key] = dep
        lock = self._lock(key)
        await lock.acquire()  # held by the re-spawn, so requests for this key wait for it
        task_ = asyncio.create_task(self._respawn(dep, lock))
        self._bg.add(task_)
        task_.add_done_callback(self._bg.discard)

    async def _respawn(self, dep: Deployment, lock: asyncio.Lock) -> None:
        try:
            logger.info("re-spawning task manager of %s for %s", dep.task_key, dep.users)
            deadline = time.monotonic() + self.recovery_timeout_s
            await self._start_task_manager(dep, deadline)
            dep.status = await self._assign(dep, dep.executors, deadline)
            dep.state = "ready"
            await self._persist(dep)
            await self._event("ready", dep.info())
            logger.info("re-spawned %s", dep.task_key)
        except ServiceFault as fault:
            dep.state = "failed"
            dep.message = f"re-spawn after restart failed: {fault.message}"
            logger.error("task %s: %s", dep.task_key, dep.message)
            self.inventory.release(dep.task_key)
            if dep.handle is not None:
                await dep.handle.kill(self.kill_grace_s)
                dep.handle = None
        finally:
            lock.release()
