"""State: every deployment, with its executors as its task manager reports them now, and every device."""

from __future__ import annotations

import asyncio

from cornserve.bus.control import ClusterState, DeploymentInfo, StateRequest
from cornserve.bus.micro import BusError
from cornserve.resource_manager.context import ResourceManagerContext
from cornserve.resource_manager.deployment import Deployment


async def cluster_state(ctx: ResourceManagerContext, req: StateRequest) -> ClusterState:
    """Every deployment (asking each TM for its executors) and every device."""
    deps = list(ctx.deployments.values())
    infos = await asyncio.gather(*(_current_info(ctx, dep) for dep in deps))
    return ClusterState(request_id=req.request_id, deployments=list(infos), devices=ctx.inventory.snapshot())


async def _current_info(ctx: ResourceManagerContext, dep: Deployment) -> DeploymentInfo:
    if dep.state != "ready":
        return dep.info()
    try:
        status = await ctx.task_managers.status(dep.task_key)
    except BusError as exc:
        return dep.info(state="failed", message=f"task manager not answering: {exc}")
    dep.status = status
    return dep.info(status)
