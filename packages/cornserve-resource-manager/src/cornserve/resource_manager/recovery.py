"""Recovery on start: adopt stored deployments whose task manager still answers, re-spawn the others.

A re-spawn runs in the background holding its key's lock, so the resource manager serves at once and
requests for that key wait for it. One bad record never keeps the others from being recovered.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cornserve.bus.control import DeploymentRecord, TaskManagerStatus
from cornserve.bus.micro import BusError, ServiceFault
from cornserve.resource_manager.context import ResourceManagerContext
from cornserve.resource_manager.deployment import Deployment, executor_id_seq
from cornserve.resource_manager.tasks import devices_per_executor

logger = logging.getLogger(__name__)


async def recover(ctx: ResourceManagerContext) -> None:
    """Adopt or re-spawn every stored deployment."""
    records = await ctx.store.records()
    await asyncio.gather(*(_recover_one(ctx, r) for r in records))


async def _recover_one(ctx: ResourceManagerContext, rec: DeploymentRecord) -> None:
    try:
        await _recover(ctx, rec)
    except Exception as exc:
        # One bad record must not keep the resource manager from serving the others.
        message = exc.message if isinstance(exc, ServiceFault) else f"{type(exc).__name__}: {exc}"
        logger.error("cannot recover deployment %s (record kept): %s", rec.task_key, message)
        ctx.inventory.release(rec.task_key)
        ctx.deployments.pop(rec.task_key, None)


async def _recover(ctx: ResourceManagerContext, rec: DeploymentRecord) -> None:
    key = rec.task_key
    try:
        task = await ctx.tasks.load(rec.task)
    except ServiceFault as fault:
        logger.error("cannot recover deployment %s (record kept): %s", key, fault.message)
        return
    if task.deployment_key != key:
        logger.error("deployment record %s holds a task with key %s; ignoring it", key, task.deployment_key)
        return
    per = devices_per_executor(task)
    dep = Deployment(task_key=key, spec=rec.task, task=task, users=list(rec.users), executors={})
    try:
        status: TaskManagerStatus | None = await ctx.task_managers.status(key)
    except BusError:
        status = None
    if status is not None:
        await _adopt(ctx, dep, rec, status)
        return
    if rec.tm_pid is not None:
        # A TM that exists but does not answer would fight the new one over the key's subjects.
        await ctx.task_managers.spawner.adopt(key, rec.tm_pid).kill(ctx.task_managers.timeouts.kill_grace_s)
    devices = list(rec.devices)
    if ctx.inventory.claim(key, devices) or len(devices) != per * rec.num_executors:
        ctx.inventory.release(key)
        placed = ctx.place_executors(key, dep.task, rec.num_executors, dep.users)
    else:
        placed = [devices[i * per : (i + 1) * per] for i in range(rec.num_executors)]
    for executor_devices in placed:
        dep.executors[dep.new_executor_id()] = executor_devices
    ctx.deployments[key] = dep
    lock = ctx.locks.lock(key)
    await lock.acquire()  # held by the re-spawn, so requests for this key wait for it
    respawn = asyncio.create_task(_respawn(ctx, dep, lock))
    ctx.background.add(respawn)
    respawn.add_done_callback(ctx.background.discard)


async def _adopt(
    ctx: ResourceManagerContext, dep: Deployment, rec: DeploymentRecord, status: TaskManagerStatus
) -> None:
    """Take over a task manager that survived the restart, with the executors it reports."""
    key = dep.task_key
    dep.executors = {e.executor_id: list(e.devices) for e in status.executors}
    dep.handle = ctx.task_managers.spawner.adopt(key, status.pid or rec.tm_pid)
    dep.status = status
    dep.state = "ready"
    dep.next_seq = max((executor_id_seq(e) for e in dep.executors), default=-1) + 1
    _add_missing_executors(dep, rec)
    conflicts = ctx.inventory.claim(key, dep.devices)
    if conflicts:
        logger.error("adopted %s uses devices not in this inventory or taken: %s", key, conflicts)
    ctx.deployments[key] = dep
    await ctx.store.save(dep)
    logger.info("adopted running task manager of %s (pid %s, users %s)", key, dep.handle.pid, dep.users)


def _add_missing_executors(dep: Deployment, rec: DeploymentRecord) -> None:
    """Desire the executors the record has and the adopted task manager does not run.

    A resource manager that died between spawning a task manager and assigning its executors (or
    in the middle of a scale-up) leaves fewer executors than recorded; the reconciliation loop
    assigns the full set again. They get the record's devices that no running executor uses.
    """
    missing = rec.num_executors - len(dep.executors)
    if missing <= 0:
        return
    per = devices_per_executor(dep.task)
    used = {(d.node, d.kind, d.index) for d in dep.devices}
    spare = [d for d in rec.devices if (d.node, d.kind, d.index) not in used]
    added = []
    for i in range(missing):
        devices = spare[i * per : (i + 1) * per]
        if len(devices) < per:
            break
        eid = dep.new_executor_id()
        dep.executors[eid] = devices
        added.append(eid)
    logger.warning(
        "adopted task manager of %s runs %d of %d recorded executor(s); reconciliation starts %s",
        dep.task_key,
        rec.num_executors - missing,
        rec.num_executors,
        ", ".join(added) or "none (the record lacks their devices)",
    )


async def _respawn(ctx: ResourceManagerContext, dep: Deployment, lock: asyncio.Lock) -> None:
    try:
        logger.info("re-spawning task manager of %s for %s", dep.task_key, dep.users)
        deadline = time.monotonic() + ctx.recovery_timeout_s
        await ctx.task_managers.start(dep, deadline)
        dep.status = await ctx.task_managers.assign(dep, dep.executors, deadline)
        dep.state = "ready"
        await ctx.persist_and_announce(dep, "ready")
        logger.info("re-spawned %s", dep.task_key)
    except ServiceFault as fault:
        dep.state = "failed"
        dep.message = f"re-spawn after restart failed: {fault.message}"
        logger.error("task %s: %s", dep.task_key, dep.message)
        ctx.inventory.release(dep.task_key)
        await ctx.task_managers.kill(dep)
        dep.handle = None
    finally:
        lock.release()
