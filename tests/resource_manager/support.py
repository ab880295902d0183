"""Helpers of the resource-manager tests: one RM process driven through its typed client."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from tests.support.processes import ServiceProcess, pids_matching

from cornserve.bus.control import (
    KV_DEPLOYMENTS,
    ClusterState,
    DeploymentInfo,
    DeploymentRecord,
    DeploymentReleaseReply,
    DeployReply,
    ProgressEvent,
)
from cornserve.bus.kv import kv_all, open_bucket
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.task import serialize_task

CPU_SLOTS = 3


class RM:
    """One resource-manager process, driven through the bus's typed client."""

    def __init__(self, nc: Client, service: ServiceProcess) -> None:
        self.nc, self.service = nc, service
        self.client = ResourceManagerClient(nc, deploy_timeout_s=90, margin_s=30, release_timeout_s=60)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.proc

    async def deploy(
        self, owner: str, *tasks: Any, on_progress: Callable[[ProgressEvent], None] | None = None
    ) -> DeployReply:
        return await self.client.deploy(owner, [serialize_task(t) for t in tasks], on_progress)

    async def release(self, owner: str) -> DeploymentReleaseReply:
        return await self.client.release(owner)

    async def state(self) -> ClusterState:
        return await self.client.state(20)

    async def scale(self, key: str, n: int) -> DeploymentInfo:
        return await self.client.scale(key, n)

    def log_text(self) -> str:
        return self.service.log()


StartRM = Callable[..., Awaitable[RM]]
"""start_rm(*extra flags): a new resource-manager process, once it answers."""


async def clear_deployments(nc: Client) -> None:
    kv = await open_bucket(nc, KV_DEPLOYMENTS)
    for rec in await kv_all(kv, DeploymentRecord):
        await kv.purge(rec.task_key)


def tm_pids(key: str) -> list[int]:
    return pids_matching("cornserve.task_manager.main", "--task-key", key)


async def collect(nc: Client, subject: str) -> tuple[list[Msg], Any]:
    got: list[Msg] = []

    async def cb(msg: Msg) -> None:
        got.append(msg)

    sub = await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return got, sub


def executor_pids(info: DeploymentInfo) -> list[int]:
    return [e.pid for e in info.executors if e.pid is not None]


def outcome(reply: DeploymentReleaseReply) -> tuple[list[str], list[str]]:
    return reply.released, reply.torn_down
