"""Deploy: make unit tasks ready for an owner, each distinct deployment key deployed at most once.

A key that is already ready just gains the owner as a user. A request is all or nothing for its
owner: if any of its tasks fails, the owner is removed again from every key this request added it to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cornserve.bus.control import DeploymentInfo, DeployReply, DeployRequest
from cornserve.bus.micro import ServiceFault
from cornserve.resource_manager.context import ResourceManagerContext
from cornserve.resource_manager.deployment import Deployment
from cornserve.resource_manager.release import drop_owner
from cornserve.resource_manager.tasks import devices_per_executor
from cornserve.task import UnitTask, serialize_task

logger = logging.getLogger(__name__)


async def deploy(ctx: ResourceManagerContext, req: DeployRequest) -> DeployReply:
    """Make every task ready for `req.owner`, deploying each distinct key at most once."""
    deadline = time.monotonic() + req.timeout_s
    tasks: list[UnitTask[Any, Any]] = []
    for i, spec in enumerate(req.tasks):
        try:
            tasks.append(await ctx.tasks.load(spec))
        except ServiceFault as fault:
            raise ServiceFault(400, "bad_task", f"tasks[{i}]: {fault.message}") from None
    keys = [t.deployment_key for t in tasks]
    unique = dict(zip(keys, tasks, strict=True))
    for key in unique:
        await ctx.announcer.progress(req.request_id, key, "queued")
    added: list[str] = []
    results = await asyncio.gather(
        *(_ensure(ctx, key, task, req, deadline, added) for key, task in unique.items()),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        # All or nothing for this owner: undo what this request added.
        for key in added:
            await drop_owner(ctx, key, req.owner)
        faults = [f for f in failures if isinstance(f, ServiceFault)]
        if faults:
            raise faults[0]
        raise failures[0]
    infos = {key: r for key, r in zip(unique, results, strict=True) if isinstance(r, DeploymentInfo)}
    return DeployReply(request_id=req.request_id, deployments=[infos[k] for k in keys])


async def _ensure(
    ctx: ResourceManagerContext,
    key: str,
    task: UnitTask[Any, Any],
    req: DeployRequest,
    deadline: float,
    added: list[str],
) -> DeploymentInfo:
    async with ctx.locks.held(key, max(0.001, deadline - time.monotonic())):
        dep = ctx.deployments.get(key)
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
                await ctx.persist_and_announce(dep, "updated")
            await ctx.announcer.progress(req.request_id, key, "shared", f"users: {', '.join(dep.users)}")
            return dep.info()
        prior_users: list[str] = []
        if dep is not None:
            # A deployment that failed (e.g. its re-spawn after a restart): start it over.
            prior_users = [u for u in dep.users if u != req.owner]
            await ctx.discard(dep)
        return await _deploy_new(ctx, key, task, req, deadline, [*prior_users, req.owner], added)


async def _deploy_new(
    ctx: ResourceManagerContext,
    key: str,
    task: UnitTask[Any, Any],
    req: DeployRequest,
    deadline: float,
    users: list[str],
    added: list[str],
) -> DeploymentInfo:
    per = devices_per_executor(task)
    await ctx.announcer.progress(req.request_id, key, "allocating", f"{per} device(s)")
    try:
        [devices] = ctx.place_executors(key, task, 1, users)
    except ServiceFault as fault:
        await ctx.announcer.progress(req.request_id, key, "failed", fault.message)
        raise
    dep = Deployment(task_key=key, spec=serialize_task(task), task=task, users=users, executors={})
    dep.executors[dep.new_executor_id()] = devices
    ctx.deployments[key] = dep
    added.append(key)
    try:
        await ctx.announcer.progress(req.request_id, key, "starting_task_manager")
        await ctx.task_managers.start(dep, deadline)
        await ctx.announcer.progress(
            req.request_id,
            key,
            "starting_executors",
            ", ".join(f"{e}: {len(d)} device(s)" for e, d in dep.executors.items()),
        )
        dep.status = await ctx.task_managers.assign(dep, dep.executors, deadline)
        dep.state = "ready"
        await ctx.store.save(dep)
    except BaseException as exc:
        message = exc.message if isinstance(exc, ServiceFault) else f"{type(exc).__name__}: {exc}"
        logger.error("deploying %s failed: %s", key, message)
        await ctx.discard(dep)
        await ctx.announcer.progress(req.request_id, key, "failed", message)
        if isinstance(exc, ServiceFault | asyncio.CancelledError):
            raise
        raise ServiceFault(502, "deploy_failed", f"task {key}: {message}") from exc
    logger.info(
        "deployed %s for %s on node %s, ranks %s",
        key,
        req.owner,
        devices[0].node,
        [d.sidecar_rank for d in dep.devices],
    )
    await ctx.announcer.changed("ready", dep.info())
    await ctx.announcer.progress(req.request_id, key, "ready")
    return dep.info()
