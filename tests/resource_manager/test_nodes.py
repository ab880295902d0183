"""A resource manager over a backend with two nodes: placement by constraint, then a node goes down.

The backend is the local spawner with the optional `NodeSpawner` methods added (two nodes of two
CPU slots on this machine, a switch that marks a node down): the resource manager, the task
managers and the executors are real processes on a real nats-server; only which node is "down" is
decided by the test. The same re-placement on real Docker engines is tests/docker/test_nodes.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from tests.support.tasklibs import echo_task

from cornserve.bus.control import DeviceInfo, TaskSpec
from cornserve.bus.micro import ServiceErrorReply
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.resource_manager.devices import DeviceInventory
from cornserve.resource_manager.manager import ResourceManager
from cornserve.resource_manager.service import ResourceManagerService
from cornserve.resource_manager.spawner import LocalSubprocessSpawner, NodeSpawner, TaskManagerHandle
from cornserve.task import serialize_task

REPLACE_DEADLINE_S = 60.0


class TwoNodes(LocalSubprocessSpawner):
    """Nodes `a` (ranks 0-1) and `b` (ranks 2-3) on this machine; `down` is set by the test."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir)
        self.down: set[str] = set()
        self.spawned_on: list[str] = []

    def node_devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(kind="cpu", index=i % 2, sidecar_rank=i, node="a" if i < 2 else "b") for i in range(4)
        ]

    async def unavailable_nodes(self) -> set[str]:
        return set(self.down)

    async def spawn_on(self, node: str, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        self.spawned_on.append(node)
        return await self.spawn(task_key, task, nats_url)

    def pids_are_local(self) -> bool:
        return True

    def one_node_per_deployment(self) -> bool:
        return True


@pytest.fixture
async def rm(
    nc: Client, nats_url: str, tmp_path: Path
) -> AsyncIterator[tuple[ResourceManagerClient, TwoNodes]]:
    spawner = TwoNodes(tmp_path / "logs")
    assert isinstance(spawner, NodeSpawner)
    manager = ResourceManager(
        nc, nats_url, DeviceInventory(spawner.node_devices()), spawner, reconcile_interval_s=0.5
    )
    service = ResourceManagerService(nc, manager, metadata={"node": "a,b"})
    await manager.start()
    await service.start()
    try:
        yield ResourceManagerClient(nc, deploy_timeout_s=90, margin_s=30, release_timeout_s=60), spawner
    finally:
        await service.stop()
        await manager.close()
        await manager.stop_task_managers()


def nodes_of(devices: list[DeviceInfo]) -> set[str]:
    return {d.node for d in devices}


@pytest.mark.slow
async def test_constraints_place_and_a_down_node_s_deployment_moves_to_the_next_allowed_node(
    rm: tuple[ResourceManagerClient, TwoNodes],
) -> None:
    client, spawner = rm
    pinned = echo_task("pinned-a", placement={"node": "a"})
    prefers_b = echo_task("prefers-b", placement={"nodes": ["b", "a"]})
    reply = await client.deploy("app", [serialize_task(pinned), serialize_task(prefers_b)])
    by_key = {d.task_key: d for d in reply.deployments}
    assert nodes_of(by_key[pinned.deployment_key].devices) == {"a"}
    assert nodes_of(by_key[prefers_b.deployment_key].devices) == {"b"}
    assert sorted(spawner.spawned_on) == ["a", "b"]

    # A task pinned to a full node fails with the node named; the deploy changes nothing.
    with pytest.raises(ServiceErrorReply) as info:
        await client.deploy("other", [serialize_task(echo_task("x", placement={"node": "b"}, devices=2))])
    assert info.value.code == "503" and "b: 1 of 2 free" in info.value.error.message

    # Node b goes down: reconciliation re-places prefers-b on a (its second choice).
    spawner.down = {"b"}
    deadline = time.monotonic() + REPLACE_DEADLINE_S
    moved = None
    while time.monotonic() < deadline:
        state = await client.state(10)
        dep = next(d for d in state.deployments if d.task_key == prefers_b.deployment_key)
        if dep.state == "ready" and nodes_of(dep.devices) == {"a"} and dep.executors:
            moved = dep
            break
        await asyncio.sleep(0.2)
    assert moved is not None, f"not re-placed on node a within {REPLACE_DEADLINE_S} s: {state}"
    assert all(e.state == "ready" for e in moved.executors)
    assert spawner.spawned_on[-1] == "a"
    # The node is full now (2 of 2 on a used, b down): one more task has nowhere to go.
    with pytest.raises(ServiceErrorReply) as info:
        await client.deploy("other", [serialize_task(echo_task("y"))])
    assert "b: down" in info.value.error.message and "a: 0 of 2 free" in info.value.error.message
