"""The `kubernetes` spawner against a fake Kubernetes API at the HTTP boundary.

The fake (`fake_api`) speaks the few endpoints the spawner calls, so the real client (lightkube)
builds and parses every request and answer. Its "kubelet" is the test: it sets a pod's phase and
container state. No live cluster: this checks the spawner's logic and its use of the API, not a kubelet.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from lightkube import AsyncClient, KubeConfig

from cornserve.bus.control import DeviceInfo
from cornserve.bus.micro import ServiceFault
from cornserve.resource_manager.k8s_pods import (
    LABEL_CLUSTER,
    KubernetesSettings,
    PodPlacement,
    task_manager_pod,
)
from cornserve.resource_manager.k8s_spawner import KubernetesApiError, KubernetesPodHandle, KubernetesSpawner
from cornserve.resource_manager.k8s_state import PodState
from cornserve.resource_manager.spawner import Spawner

from .fake_api import NS, FakeApi, kubeconfig, serve
from .support import check_names, validate

TASK = {"name": "lib:EncoderTask", "config": {"model_id": "/models/tiny"}}
NATS = "nats://nats-0.nats:4222"


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeApi, str]]:
    fake = FakeApi()
    async with serve(fake) as url:
        yield fake, url


def _spawner(url: str, cluster: str = "cornserve") -> KubernetesSpawner:
    settings = KubernetesSettings(namespace=NS, cluster=cluster)
    config = KubeConfig.from_dict(kubeconfig(url))
    client = AsyncClient(config=config, namespace=NS, trust_env=False)
    return KubernetesSpawner(settings, client=client, poll_s=3600)


DEVICES = {
    "llm": [DeviceInfo(kind="cuda", index=i, sidecar_rank=i, node="gpu-7") for i in (2, 3)],
    "enc": [DeviceInfo(kind="cpu", index=0, sidecar_rank=0, node="worker-0")],
}


async def test_spawn_posts_the_pure_pod_spec_and_it_validates(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    spawner = _spawner(url)
    spawner.devices_of = lambda key: DEVICES[key]
    try:
        for key in ("llm", "enc"):
            handle = await spawner.spawn(key, TASK, NATS)
            assert handle.pid is None and handle.exit_code() is None
        llm, enc = fake.posted
        expected = task_manager_pod(
            "llm", TASK, NATS, spawner.settings, PodPlacement(node="gpu-7", cuda_indices=(2, 3))
        )
        assert llm == expected
        assert llm["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
        assert "limits" not in enc["spec"]["containers"][0].get("resources", {})
        for body in fake.posted:
            validate(body)
            check_names(body)
    finally:
        await spawner.close()


async def test_the_handle_follows_the_pod_to_its_exit_and_log(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    spawner = _spawner(url)
    try:
        handle = await spawner.spawn("enc", TASK, NATS)
        [name] = fake.pods
        fake.run(name)
        await spawner.refresh()
        assert handle.exit_code() is None
        assert [k for k, _ in spawner.running()] == ["enc"]
        fake.exit(name, 3, "".join(f"line {i}\n" for i in range(100)) + "TaskLoadError: no such task\n")
        await spawner.refresh()
        assert handle.exit_code() == 3
        tail = handle.log_tail()
        assert "Failed" in tail and "code 3" in tail and tail.endswith("TaskLoadError: no such task\n")
        assert "line 10\n" not in tail  # only the last lines
        assert [(k, h.exit_code()) for k, h in spawner.running()] == [("enc", 3)]  # for the reaper
        del fake.pods[name]  # deleted by someone else
        await spawner.refresh()
        assert handle.exit_code() == -1
    finally:
        await spawner.close()


async def test_a_restarted_resource_manager_adopts_and_kills_by_label(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    first = _spawner(url)
    other = _spawner(url, cluster="another")
    try:
        await first.spawn("enc", TASK, NATS)
        await other.spawn("enc", TASK, NATS)  # another cluster's pod in the same namespace
        for name in fake.pods:
            fake.run(name)
    finally:
        await first.close()
        await other.close()
    mine = next(n for n, p in fake.pods.items() if p["metadata"]["labels"][LABEL_CLUSTER] == "cornserve")
    second: Spawner = _spawner(url)
    assert isinstance(second, KubernetesSpawner)
    try:
        handle = second.adopt("enc", None)
        assert handle.exit_code() is None  # nothing listed yet: not known to be gone
        await second.refresh()
        assert [(k, h.exit_code()) for k, h in second.running()] == [("enc", None)]
        fake.linger = True
        kill = asyncio.create_task(handle.kill(0.5))
        await asyncio.sleep(0.3)
        assert not kill.done() and fake.pods[mine]["metadata"].get("deletionTimestamp")
        fake.linger = False
        del fake.pods[mine]  # the kubelet is done with it
        await asyncio.wait_for(kill, 10)
        assert mine not in fake.pods and handle.exit_code() == -1
        assert len(fake.pods) == 1  # the other cluster's pod is untouched
    finally:
        await second.close()


async def test_spawning_a_key_again_replaces_its_earlier_pod(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    spawner = _spawner(url)
    try:
        await spawner.spawn("enc", TASK, NATS)
        [old] = fake.pods
        await spawner.spawn("enc", TASK, NATS)
        [new] = fake.pods
        assert new != old
    finally:
        await spawner.close()


async def test_api_refusals_are_clear_502_faults(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    spawner = _spawner(url)
    fake.refuse_create = 403
    try:
        with pytest.raises(KubernetesApiError) as caught:
            await spawner.spawn("enc", TASK, NATS)
        assert caught.value.code == 502 and caught.value.status == 403
        assert "creating the task-manager pod of enc in namespace cornserve" in caught.value.message
        assert (
            "cannot create resource" in caught.value.message
            and "deploy/k8s/resource-manager.yaml" in caught.value.message
        )
    finally:
        await spawner.close()


async def test_an_unreachable_api_is_a_fault_not_a_hang() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    await runner.cleanup()  # nothing listens there now
    spawner = _spawner(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(KubernetesApiError, match="listing task-manager pods"):
            await asyncio.wait_for(spawner.spawn("enc", TASK, NATS), 30)
    finally:
        await spawner.close()


async def test_devices_on_two_nodes_cannot_be_one_pod(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    spawner = _spawner(url)
    spawner.devices_of = lambda key: [*DEVICES["llm"], *DEVICES["enc"]]
    try:
        with pytest.raises(ServiceFault) as caught:
            await spawner.spawn("mixed", TASK, NATS)
        assert caught.value.code == 409 and "gpu-7, worker-0" in caught.value.message
        assert fake.posted == []
    finally:
        await spawner.close()


async def test_an_answer_that_is_not_the_apis_is_a_fault(api: tuple[FakeApi, str]) -> None:
    fake, url = api
    spawner = _spawner(url)
    fake.garbage = True
    try:
        with pytest.raises(
            KubernetesApiError, match="listing task-manager pods in namespace cornserve failed"
        ):
            await spawner.refresh()
    finally:
        await spawner.close()


def _state(name: str, key: str = "enc") -> PodState:
    return PodState(
        name=name,
        task_key=key,
        phase="Running",
        created="2026-12-01T10:00:00Z",
        node_name="n",
        exit_code=None,
        detail="",
        deleting=False,
    )


async def test_a_list_that_started_before_the_pod_existed_cannot_say_it_is_gone() -> None:
    spawner = _spawner("http://127.0.0.1:9")  # never called: the lists are played by hand
    snap = spawner.snapshot
    try:
        early = snap.ticket()  # e.g. the refresh loop's list, sent before the pod was created
        handle = KubernetesPodHandle(spawner, "enc", "pod-1")
        late = snap.ticket()  # spawn's own list, after the create
        assert snap.replace(late, [_state("pod-1")])
        assert not snap.replace(early, [])  # answered last, started first: dropped
        assert handle.exit_code() is None
        early2 = snap.ticket()
        handle2 = KubernetesPodHandle(spawner, "enc", "pod-2")
        assert snap.replace(early2, [_state("pod-1")])  # started before pod-2: says nothing of it
        assert handle2.exit_code() is None
        assert snap.replace(snap.ticket(), [_state("pod-1")])  # started after: pod-2 is gone
        assert handle2.exit_code() == -1 and handle.exit_code() is None
    finally:
        await spawner.close()
