"""A real resource manager with `--spawner kubernetes`, against the fake Kubernetes API and its fake kubelet.

The node inventory (`k8s_nodes`, the spawner's `NodeSpawner` methods) comes from the fake API's
Node objects and the sidecar ranks ConfigMap: tested on the spawner itself below, and through
the resource manager, whose devices are the fake node's.

The resource manager (a real process) talks to the fake API through lightkube; the fake kubelet
runs each pod's container (a real task manager, with the pod's arguments and environment) as a
local process, which starts a real echo executor. So the spawner's wiring inside the resource
manager is exercised end to end: deploy, a crashed task manager re-created as a new pod, a
restarted resource manager adopting the pod by its labels, release deleting it. No live cluster.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from lightkube import AsyncClient, KubeConfig
from nats.aio.client import Client
from tests.k8s.fake_api import NODE, NS, RANKS_CONFIGMAP, FakeApi, FakeKubelet, fake_node, kubeconfig, serve
from tests.resource_manager.support import StartRM, outcome
from tests.support.tasklibs import echo_task
from tests.support.waiting import wait_for, wait_gone

from cornserve.bus.control import DeploymentInfo
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.resource_manager.k8s_pods import ANNOTATION_TASK_KEY, KubernetesSettings
from cornserve.resource_manager.k8s_spawner import (
    KubernetesApiError,
    KubernetesConfigError,
    KubernetesSpawner,
)
from cornserve.resource_manager.spawner import (
    NodeSpawner,
    one_node_per_deployment,
    pids_are_local,
    spawner_devices,
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeApi, list[str]]]:
    """The fake API with its kubelet, and the resource-manager flags that point at it."""
    api = FakeApi(FakeKubelet(tmp_path / "kubelet"))
    async with serve(api) as url:
        config = tmp_path / "kubeconfig"
        config.write_text(json.dumps(kubeconfig(url)))
        settings = tmp_path / "spawner.json"
        # No Secrets (this NATS has no users) and the pod network (the fake kubelet has none).
        settings.write_text(
            json.dumps({"nats_creds_secret": None, "executor_nats_creds_secret": None, "host_network": False})
        )
        flags = ["--spawner", "kubernetes", "--k8s-kubeconfig", str(config), "--k8s-settings", str(settings)]
        yield api, flags


def _pods_of(api: FakeApi, key: str) -> list[str]:
    return [n for n, p in api.pods.items() if p["metadata"]["annotations"][ANNOTATION_TASK_KEY] == key]


async def _echo(nc: Client, key: str) -> str:
    route = await TaskManagerClient(nc, key).route(10)
    async with aiohttp.ClientSession() as s, s.post(route.url + "/echo", json={"text": "hi"}) as resp:
        text: str = (await resp.json())["text"]
        return text


@pytest.mark.slow
async def test_task_managers_are_pods_created_recreated_adopted_and_deleted(
    cluster: tuple[FakeApi, list[str]], start_rm: StartRM, nc: Client
) -> None:
    api, flags = cluster
    rm = await start_rm(*flags)
    task = echo_task("k8s")
    key = task.deployment_key

    (dep,) = (await rm.deploy("app", task)).deployments
    assert dep.state == "ready"
    # The inventory is the fake node's: its CPU slots, ranks from the ranks ConfigMap.
    assert {(d.node, d.kind) for d in dep.devices} == {(NODE, "cpu")}
    assert all(0 <= d.sidecar_rank < 3 for d in dep.devices)
    [pod] = _pods_of(api, key)
    body = api.posted[0]
    assert body["spec"]["affinity"]["nodeAffinity"]  # pinned to the devices' node
    assert await _echo(nc, key) == "hi"

    # The task manager crashes: its pod ends, the resource manager re-creates it as a new pod.
    tm = api.kubelet.procs[pod] if api.kubelet else None
    assert tm is not None
    tm.signal(signal.SIGKILL)

    async def recreated() -> DeploymentInfo | None:
        state = await rm.state()
        pods = _pods_of(api, key)
        ok = state.deployments and state.deployments[0].state == "ready" and pods and pods != [pod]
        return state.deployments[0] if ok else None

    await wait_for(recreated, 60, "the task manager re-created as a new pod")
    assert pod in api.deleted  # the ended pod was deleted, not left behind
    [pod2] = _pods_of(api, key)
    assert await _echo(nc, key) == "hi"

    log = rm.log_text()
    assert "exited with code 137; re-creating its task manager" in log, log
    assert "HTTP Request" not in log  # the client's line per call would drown the log

    # A restarted resource manager adopts the running pod by its labels: no new pod.
    assert rm.service.stop(timeout=60) == 0
    rm = await start_rm(*flags)
    (adopted,) = (await rm.state()).deployments
    assert adopted.state == "ready" and adopted.users == ["app"]
    assert "adopted running task manager of" in rm.log_text()
    assert _pods_of(api, key) == [pod2] and len(api.posted) == 2

    # Release: the pod is deleted and its processes are gone.
    executors = [e.pid for e in adopted.executors if e.pid is not None]
    assert outcome(await rm.release("app")) == ([key], [key])
    await wait_for(lambda: not _pods_of(api, key), 30, "the pod to be deleted")
    await wait_gone([api.kubelet.procs[pod2].pid, *executors] if api.kubelet else [])


def _spawner(url: str, **settings: object) -> KubernetesSpawner:
    config = KubeConfig.from_dict(kubeconfig(url))
    client = AsyncClient(config=config, namespace=NS, trust_env=False)
    return KubernetesSpawner(
        KubernetesSettings(namespace=NS, **settings),  # type: ignore[arg-type]
        client=client,
        poll_s=3600,
        device_kind="auto",
        cpu_slots=4,
    )


async def test_the_node_inventory_is_the_nodes_that_run_sidecars() -> None:
    api = FakeApi()
    api.nodes = [
        fake_node("gpu-1", gpus="2", labels={"nvidia.com/gpu.memory": "81559", "pool": "serve"}),
        fake_node("cpu-1", cpu="2500m", labels={"pool": "serve"}),  # 2 whole CPUs: 2 of the 4 slots
        fake_node("cpu-2", labels={"pool": "serve"}),  # no sidecar ranks: runs no sidecars
        fake_node("other", labels={"pool": "batch"}),  # not selected
    ]
    api.configmaps = {RANKS_CONFIGMAP: {"gpu-1": "10", "cpu-1": "20", "other": "30"}}
    async with serve(api) as url:
        spawner = _spawner(url, node_selector={"pool": "serve"})
        try:
            assert isinstance(spawner, NodeSpawner)
            assert not pids_are_local(spawner) and one_node_per_deployment(spawner)
            await spawner.start()
            devices = spawner_devices(spawner, lambda: [])
            assert [(d.node, d.kind, d.index, d.sidecar_rank, d.memory_bytes) for d in devices] == [
                ("cpu-1", "cpu", 0, 20, None),
                ("cpu-1", "cpu", 1, 21, None),
                ("gpu-1", "cuda", 0, 10, 81559 * 2**20),
                ("gpu-1", "cuda", 1, 11, 81559 * 2**20),
            ]
            assert await spawner.unavailable_nodes() == set()
            # A node that is not Ready, or cordoned, is down; a node that is gone, too.
            api.nodes[0] = fake_node("gpu-1", gpus="2", ready=False, labels={"pool": "serve"})
            assert await spawner.unavailable_nodes() == {"gpu-1"}
            api.nodes[0] = fake_node("gpu-1", gpus="2", unschedulable=True, labels={"pool": "serve"})
            api.nodes[1] = fake_node("cpu-1", labels={"pool": "serve"})
            assert await spawner.unavailable_nodes() == {"gpu-1"}
            api.nodes = [n for n in api.nodes if n["metadata"]["name"] != "cpu-1"]
            assert await spawner.unavailable_nodes() == {"gpu-1", "cpu-1"}
            # A node whose objects say nonsense is left out, not a crash.
            api.nodes.append(
                {
                    "metadata": {"name": "bad", "labels": {"pool": "serve"}},
                    "status": {"allocatable": {"cpu": "lots"}},
                }
            )
            assert await spawner.unavailable_nodes() == {"gpu-1", "cpu-1"}
        finally:
            await spawner.close()


async def test_an_inventory_without_devices_or_with_overlapping_ranks_is_refused_with_the_reason() -> None:
    api = FakeApi()
    api.nodes = [fake_node("a"), fake_node("b")]
    async with serve(api) as url:
        api.configmaps = {RANKS_CONFIGMAP: {"c": "0"}}
        spawner = _spawner(url)
        try:
            with pytest.raises(KubernetesConfigError, match="no Kubernetes node offers devices"):
                await spawner.start()
            api.configmaps = {RANKS_CONFIGMAP: {"a": "0", "b": "2"}}  # a has 4 slots: ranks 0..3
            with pytest.raises(KubernetesConfigError, match="overlap"):
                await spawner.start()
            api.configmaps = {}
            with pytest.raises(KubernetesApiError, match="cornserve-sidecar-ranks"):
                await spawner.start()
        finally:
            await spawner.close()
