"""Every pod spec the `kubernetes` spawner generates validates against the Kubernetes API schemas.

The specs come from `task_manager_pod`, the pure function the spawner sends as it is (the fake-API
test checks that the body the spawner POSTs is that function's output).
"""

from __future__ import annotations

from typing import Any

import pytest

from cornserve.bus.control import DeviceInfo
from cornserve.resource_manager.k8s_pods import (
    ANNOTATION_TASK_KEY,
    GPU_RESOURCE,
    KubernetesSettings,
    PlacementError,
    PodPlacement,
    placement_of,
    selector_labels,
    task_manager_pod,
)

from .support import check_names, validate

TASK = {
    "name": "cornserve.task.builtins.encoder:EncoderTask",
    "config": {"model_id": "/models/tiny", "modality": "image"},
}
NATS = "nats://nats-0.nats:4222,nats://nats-1.nats:4222,nats://nats-2.nats:4222"
FULL = KubernetesSettings(
    image="registry.example/cornserve-node:1.2",
    gpu_image="registry.example/cornserve-vllm:1.2",
    node_selector={"cornserve.io/sidecars": "true"},
    models_claim="cornserve-models",
    cpu_request="2",
    memory_request="8Gi",
)
BARE = KubernetesSettings(nats_creds_secret=None, executor_nats_creds_secret=None, host_network=False)

CASES: dict[str, tuple[str, KubernetesSettings, PodPlacement]] = {
    "cpu-task-anywhere": ("encoder-ab12cd34", KubernetesSettings(), PodPlacement()),
    "cpu-task-pinned": ("encoder-ab12cd34", FULL, PodPlacement(node="worker-0")),
    "gpu-task-pinned": (
        "llm:Qwen/Qwen2-VL-7B:0123456789abcdef",
        FULL,
        PodPlacement(node="gpu-7", cuda_indices=(2, 3)),
    ),
    "gpu-task-no-secrets": ("llm-x", BARE, PodPlacement(node="gpu-7", cuda_indices=(0,))),
    "long-odd-key": ("LLM::" + "x" * 200 + "::/weird key/", KubernetesSettings(), PodPlacement(node="n")),
}


def _pod(case: str) -> dict[str, Any]:
    key, settings, placement = CASES[case]
    return task_manager_pod(
        key, TASK, NATS, settings, placement, "DEBUG", {"CORNSERVE_ALLOW_EXECUTOR_FLAGS": "--host"}
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_pod_spec_validates_against_the_api_schema(case: str) -> None:
    pod = _pod(case)
    validate(pod)
    check_names(pod)


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = pod["spec"]["containers"]
    return container


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in _container(pod)["env"]}


def test_a_gpu_task_requests_its_gpus_on_its_node() -> None:
    pod = _pod("gpu-task-pinned")
    assert _container(pod)["resources"]["limits"] == {GPU_RESOURCE: "2"}
    assert _container(pod)["image"] == "registry.example/cornserve-vllm:1.2"
    [term] = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-7"]}
    ]
    assert {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    # The pod sees its 2 GPUs as 0 and 1: the task manager renumbers node-wide 2, 3.
    assert _env(pod)["CORNSERVE_CUDA_INDEX_MAP"] == "2:0,3:1"


def test_a_cpu_task_requests_no_gpu() -> None:
    pod = _pod("cpu-task-pinned")
    assert GPU_RESOURCE not in str(pod)
    assert _container(pod)["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}}
    assert _container(pod)["image"] == "registry.example/cornserve-node:1.2"
    assert "CORNSERVE_CUDA_INDEX_MAP" not in _env(pod)
    assert "affinity" not in _pod("cpu-task-anywhere")["spec"]


def test_the_pod_shares_the_nodes_shm_and_is_found_by_its_labels() -> None:
    pod = _pod("gpu-task-pinned")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["shm"] == {"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}
    assert {"name": "shm", "mountPath": "/dev/shm"} in _container(pod)["volumeMounts"]
    assert selector_labels(FULL).items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"][ANNOTATION_TASK_KEY] == CASES["gpu-task-pinned"][0]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_credentials_come_from_secrets_copied_to_private_files() -> None:
    pod = _pod("gpu-task-pinned")
    secrets = {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert secrets == {"cornserve-nats-task-manager", "cornserve-nats-executor"}
    env = _env(pod)
    assert env["CORNSERVE_NATS_CREDS"] == "/etc/cornserve/nats/task-manager.json"
    assert env["CORNSERVE_EXECUTOR_NATS_CREDS"] == "/etc/cornserve/nats/executor.json"
    [init] = pod["spec"]["initContainers"]
    assert "install -m 0600" in init["command"][-1]
    bare = _pod("gpu-task-no-secrets")
    assert "initContainers" not in bare["spec"] and "CORNSERVE_NATS_CREDS" not in _env(bare)
    assert "hostNetwork" not in bare["spec"]


def test_the_task_manager_gets_its_task_and_the_passed_settings() -> None:
    pod = _pod("cpu-task-pinned")
    args = _container(pod)["args"]
    assert args[args.index("--task-key") + 1] == "encoder-ab12cd34"
    assert args[args.index("--nats-url") + 1] == NATS
    assert _env(pod)["CORNSERVE_ALLOW_EXECUTOR_FLAGS"] == "--host"
    assert _env(pod)["CORNSERVE_NATS_URL"] == NATS


def test_placement_follows_the_devices() -> None:
    gpus = [DeviceInfo(kind="cuda", index=i, sidecar_rank=8 + i, node="gpu-7") for i in (3, 1)]
    assert placement_of(gpus) == PodPlacement(node="gpu-7", cuda_indices=(1, 3))
    cpus = [DeviceInfo(kind="cpu", index=0, sidecar_rank=0, node="worker-0")]
    assert placement_of(cpus) == PodPlacement(node="worker-0")
    assert placement_of([]) == PodPlacement()
    with pytest.raises(PlacementError, match="gpu-7, worker-0"):
        placement_of([*gpus, *cpus])


def test_settings_refuse_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="namepsace"):
        KubernetesSettings.model_validate({"namepsace": "x"})
    with pytest.raises(ValueError, match="cluster"):
        KubernetesSettings(cluster="not a label value!")
