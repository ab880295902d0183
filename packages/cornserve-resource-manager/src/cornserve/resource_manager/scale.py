"""Scale: run a given number of executors of a deployed task, allocating or freeing their devices.

Scaling up allocates devices first and frees them again if the task manager cannot start the new
executors (which are then taken back to the previous set); scaling down drains the last executors.
"""

from __future__ import annotations

import logging
import time

from cornserve.bus.control import DeploymentInfo, DeviceInfo, ScaleRequest
from cornserve.bus.micro import ServiceFault
from cornserve.resource_manager.context import ResourceManagerContext
from cornserve.resource_manager.deployment import Deployment
from cornserve.resource_manager.tasks import devices_per_executor

logger = logging.getLogger(__name__)


async def scale(ctx: ResourceManagerContext, req: ScaleRequest) -> DeploymentInfo:
    """Run `num_executors` executors: allocate devices and start executors, or drain and free."""
    if req.task_key not in ctx.deployments:
        raise ServiceFault(404, "unknown_task", f"no deployed task {req.task_key!r}")
    deadline = time.monotonic() + req.timeout_s
    async with ctx.locks.held(req.task_key, req.timeout_s):
        dep = ctx.deployments.get(req.task_key)
        if dep is None:
            raise ServiceFault(404, "unknown_task", f"task {req.task_key!r} was torn down")
        if dep.state != "ready":
            raise ServiceFault(409, "not_ready", f"task {req.task_key} is {dep.state}: {dep.message}")
        current = dict(dep.executors)
        if req.num_executors == len(current):
            return dep.info()
        added: dict[str, list[DeviceInfo]] = {}
        if req.num_executors > len(current):
            per = devices_per_executor(dep.task)
            count = req.num_executors - len(current)
            await ctx.announcer.progress(
                req.request_id, dep.task_key, "allocating", f"{count * per} device(s)"
            )
            for devices in ctx.place_executors(dep.task_key, dep.task, count, dep.users, current):
                added[dep.new_executor_id()] = devices
            desired = {**current, **added}
        else:
            desired = dict(list(current.items())[: req.num_executors])
        await ctx.announcer.progress(req.request_id, dep.task_key, "starting_executors")
        try:
            status = await ctx.task_managers.assign(dep, desired, deadline)
        except ServiceFault as fault:
            await ctx.announcer.progress(req.request_id, dep.task_key, "failed", fault.message)
            if added:
                ctx.inventory.release(dep.task_key, [d for devs in added.values() for d in devs])
                await _restore(ctx, dep, current)
            raise
        for eid, devs in current.items():
            if eid not in desired:
                ctx.inventory.release(dep.task_key, devs)
        dep.executors = desired
        dep.status = status
        await ctx.persist_and_announce(dep, "updated")
        await ctx.announcer.progress(req.request_id, dep.task_key, "ready")
        logger.info("scaled %s to %d executor(s)", dep.task_key, len(desired))
        return dep.info()


async def _restore(
    ctx: ResourceManagerContext, dep: Deployment, executors: dict[str, list[DeviceInfo]]
) -> None:
    """After a failed scale-up, put the task manager back on the previous executor set."""
    try:
        dep.status = await ctx.task_managers.assign(dep, executors, time.monotonic() + ctx.recovery_timeout_s)
    except ServiceFault as fault:
        dep.state = "failed"
        dep.message = f"restoring executors after a failed scale-up failed: {fault.message}"
        logger.error("task %s: %s", dep.task_key, dep.message)
