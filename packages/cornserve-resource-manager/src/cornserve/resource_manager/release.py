"""Release: remove an owner from its deployments; a deployment left with no user is torn down."""

from __future__ import annotations

import logging

from cornserve.bus.control import DeploymentReleaseReply, DeploymentReleaseRequest
from cornserve.resource_manager.context import ResourceManagerContext
from cornserve.resource_manager.deployment import Deployment

logger = logging.getLogger(__name__)


async def release(ctx: ResourceManagerContext, req: DeploymentReleaseRequest) -> DeploymentReleaseReply:
    """Drop the owner everywhere; tear down tasks nobody uses any more."""
    released: list[str] = []
    torn_down: list[str] = []
    for key in [k for k, d in ctx.deployments.items() if req.owner in d.users]:
        was_torn = await drop_owner(ctx, key, req.owner)
        if was_torn is None:
            continue
        released.append(key)
        if was_torn:
            torn_down.append(key)
    return DeploymentReleaseReply(request_id=req.request_id, released=released, torn_down=torn_down)


async def drop_owner(ctx: ResourceManagerContext, key: str, owner: str) -> bool | None:
    """None if the owner did not use the key; else whether the key was torn down."""
    async with ctx.locks.held(key, ctx.lock_timeout_s):
        dep = ctx.deployments.get(key)
        if dep is None or owner not in dep.users:
            return None
        dep.users.remove(owner)
        if dep.users:
            await ctx.persist_and_announce(dep, "updated")
            return False
        await _teardown(ctx, dep)
        return True


async def _teardown(ctx: ResourceManagerContext, dep: Deployment) -> None:
    dep.state = "stopping"
    logger.info("tearing down %s", dep.task_key)
    await ctx.task_managers.stop(dep)
    ctx.deployments.pop(dep.task_key, None)
    ctx.inventory.release(dep.task_key)
    await ctx.store.delete(dep.task_key)
    await ctx.announcer.changed("removed", dep.info())
