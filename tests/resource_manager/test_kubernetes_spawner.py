"""A real resource manager with `--spawner kubernetes`, against the fake Kubernetes API and its fake kubelet.

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
from nats.aio.client import Client
from tests.k8s.fake_api import FakeApi, FakeKubelet, kubeconfig, serve
from tests.resource_manager.support import StartRM, outcome
from tests.support.tasklibs import echo_task
from tests.support.waiting import wait_for, wait_gone

from cornserve.bus.control import DeploymentInfo
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.resource_manager.k8s_pods import ANNOTATION_TASK_KEY


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


async def test_task_managers_are_pods_created_recreated_adopted_and_deleted(
    cluster: tuple[FakeApi, list[str]], start_rm: StartRM, nc: Client
) -> None:
    api, flags = cluster
    rm = await start_rm(*flags)
    task = echo_task("k8s")
    key = task.deployment_key

    (dep,) = (await rm.deploy("app", task)).deployments
    assert dep.state == "ready"
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
