"""The pods of the `kubernetes` spawner, as pure functions: settings in, a Pod manifest (a dict) out.

Kept apart from the API client so every spec the spawner can send is testable offline: the tests
validate them against the Kubernetes API schemas (`kubernetes-validate`), and the spawner hands the
very same dict to the API. Nothing here talks to a cluster.

Why these choices (docs/operations.md, "Kubernetes", says the same for operators):

- **One pod per task manager; its executors are its child processes.** The task manager forks its
  executors (`cornserve.task_manager.executor`), so the task manager's pod is where they run: it
  requests the deployment's GPUs (``nvidia.com/gpu``) and is pinned to the node its devices are on.
  The device plugin picks which GPUs and the pod numbers them 0..K-1, so the pod carries
  ``CORNSERVE_CUDA_INDEX_MAP`` for the task manager to renumber its executors' devices.
- **`/dev/shm` is a hostPath volume**, not an ``emptyDir`` with ``medium: Memory``: an emptyDir
  belongs to one pod, and the sidecars (a DaemonSet, other pods) and the executors must open the
  same shared-memory segments by name. The node's own ``/dev/shm`` (a tmpfs) is the one directory
  both see; the sidecar DaemonSet mounts the same path (deploy/k8s/sidecars.yaml).
- **The node's network** (`host_network`, the default): executors listen on 127.0.0.1 and the
  dispatchers call them there (`cornserve.task_manager.executor`), as under Docker Compose's host
  networking; the dispatchers run with host networking on the same nodes.
- **restartPolicy Never**: the resource manager's reconciliation re-creates a dead task manager
  (with a fresh pod), so the kubelet restarting it in place would only hide the exit.
- **Found again by labels**: every pod carries the cluster's and the role's labels (the selector
  `running()` lists by) and the exact task key as an annotation (label values are too restricted
  for keys, so the label holds a hash of it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cornserve.bus.control import DeviceInfo, TaskSpec

GPU_RESOURCE = "nvidia.com/gpu"
"""The extended resource NVIDIA's device plugin advertises; a GPU pod's limit on it."""
LABEL_APP = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_CLUSTER = "cornserve.io/cluster"
LABEL_TASK_KEY_HASH = "cornserve.io/task-key-hash"
ANNOTATION_TASK_KEY = "cornserve.io/task-key"
ANNOTATION_NODE = "cornserve.io/node"
MANAGED_BY = "cornserve-resource-manager"
COMPONENT = "task-manager"
CONTAINER = "task-manager"
SHM_MOUNT = "/dev/shm"
LOG_MOUNT = "/var/log/cornserve"
CREDS_DIR = "/etc/cornserve/nats"
"""Where the pod's NATS role files are, 0600 and the pod user's (copied from the Secrets)."""
SECRET_SOURCE_DIR = "/run/cornserve/secrets"
"""Where the init container reads the Secrets (root's files, group-readable)."""
CREDS_KEY = "creds.json"
"""The key of a NATS role Secret: ``kubectl create secret generic NAME --from-file=creds.json=ROLE.json``."""
MODELS_MOUNT = "/models"
TASK_MANAGER_UID = 10001
"""The images' unprivileged user (deploy/docker/Dockerfile)."""


def container_security() -> dict[str, Any]:
    """Every container of a task-manager pod: no privilege escalation, no capabilities."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


_DNS_LABEL = re.compile(r"[^a-z0-9-]+")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class KubernetesSettings(BaseModel):
    """What the `kubernetes` spawner needs to know about the cluster it creates pods in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field(default="cornserve", min_length=1, max_length=63)
    """Namespace of the task-manager pods (the resource manager's RBAC Role is in this namespace)."""
    cluster: str = Field(default="cornserve", min_length=1, max_length=63, pattern=_LABEL_VALUE.pattern)
    """Value of the ``cornserve.io/cluster`` label: tells this cluster's pods from another one's."""
    image: str = Field(default="cornserve-node:latest", min_length=1)
    """Image of CPU task managers (and so of their executors): the `node` image of deploy/docker."""
    gpu_image: str | None = None
    """Image of GPU task managers (default: `image`); the `vllm` image of deploy/docker for vLLM."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    node_label: str = Field(default="kubernetes.io/hostname", min_length=1)
    """Node label whose value is a Cornserve node id: a pod is pinned to ``<node_label> In [<node>]``."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Further labels every task-manager node must have (a node pool, say)."""
    shm_host_path: str = Field(default="/dev/shm", pattern=r"^/")
    """The node's tmpfs that the sidecar DaemonSet mounts too, mounted at /dev/shm in the pod."""
    nats_creds_secret: str | None = "cornserve-nats-task-manager"
    """Secret with the task-manager role's NATS credentials (key `creds.json`); None: no credentials."""
    executor_nats_creds_secret: str | None = "cornserve-nats-executor"
    """Secret with the executor role's NATS credentials (key `creds.json`), handed to the executors."""
    models_claim: str | None = None
    """PersistentVolumeClaim mounted read-only at /models (the checkpoints executors load)."""
    cpu_request: str | None = None
    """``resources.requests.cpu`` of every task-manager pod (e.g. "2"); None: none."""
    memory_request: str | None = None
    """``resources.requests.memory`` of every task-manager pod (e.g. "8Gi"); None: none."""
    termination_grace_s: int = Field(default=30, ge=0, le=3600)
    """The pod's terminationGracePeriodSeconds: the task manager stops its executors in it."""
    host_network: bool = True
    """Run in the node's network namespace, as the dispatchers do (deploy/k8s/dispatcher.yaml):
    executors listen on the loopback address and the dispatchers call them at 127.0.0.1."""
    sidecar_ranks_configmap: str = Field(default="cornserve-sidecar-ranks", min_length=1)
    """ConfigMap (in `namespace`) of each node's first sidecar rank, the sidecar DaemonSet's own:
    the node inventory takes its nodes and ranks from it (`k8s_nodes`)."""
    gpu_toleration: bool = True
    """GPU pods tolerate the ``nvidia.com/gpu`` NoSchedule taint GPU node pools commonly carry."""


class PodPlacement(BaseModel):
    """Where one task manager runs: the node of its devices and how many GPUs it requests."""

    model_config = ConfigDict(frozen=True)

    node: str | None = None
    """Cornserve node id (the value of `KubernetesSettings.node_label`); None: anywhere."""
    cuda_indices: tuple[int, ...] = ()
    """The node-wide indices of its GPUs (the resource manager's numbering), one ``nvidia.com/gpu`` each."""

    @property
    def gpus(self) -> int:
        """How many GPUs the pod requests."""
        return len(self.cuda_indices)

    def cuda_index_map(self) -> str:
        """``CORNSERVE_CUDA_INDEX_MAP`` of the pod: node-wide index to the pod's own (0..K-1), "2:0,3:1".

        The device plugin hands the pod K GPUs that it sees as 0..K-1; the task manager renumbers
        its executors' devices with this map (`cornserve.task_manager.devices`).
        """
        return ",".join(f"{node_index}:{pod_index}" for pod_index, node_index in enumerate(self.cuda_indices))


class PlacementError(ValueError):
    """A deployment's devices cannot be one pod's (they span several nodes)."""


def placement_of(devices: Sequence[DeviceInfo]) -> PodPlacement:
    """The placement of a task manager whose executors use `devices` (all on one node, or none)."""
    nodes = sorted({d.node for d in devices})
    if len(nodes) > 1:
        raise PlacementError(
            f"a task manager's executors are its child processes, so its devices must be on one node; "
            f"they are on {', '.join(nodes)}"
        )
    cuda = sorted({d.index for d in devices if d.kind == "cuda"})
    return PodPlacement(node=nodes[0] if nodes else None, cuda_indices=tuple(cuda))


def task_key_hash(task_key: str) -> str:
    """A label-safe stand-in for a task key (keys may be longer than 63 characters or use ':')."""
    return hashlib.sha256(task_key.encode()).hexdigest()[:32]


def selector_labels(settings: KubernetesSettings) -> dict[str, str]:
    """The labels every task-manager pod of this cluster has: what `running()` lists by."""
    return {
        LABEL_APP: "cornserve",
        LABEL_COMPONENT: COMPONENT,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_CLUSTER: settings.cluster,
    }


def pod_name_prefix(task_key: str) -> str:
    """``generateName`` of a task key's pods: readable, DNS-safe, short enough for the API's suffix."""
    slug = _DNS_LABEL.sub("-", task_key.lower()).strip("-")[:40].strip("-") or "task"
    return f"cornserve-tm-{slug}-"


def task_manager_pod(
    task_key: str,
    task: TaskSpec,
    nats_url: str,
    settings: KubernetesSettings,
    placement: PodPlacement,
    log_level: str = "INFO",
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Pod manifest of the task manager of `task_key` (apiVersion v1, no name: generateName).

    `env` is extra ``CORNSERVE_*`` settings passed on as they are (e.g. the executor-flag allow-list).
    """
    image = (settings.gpu_image or settings.image) if placement.gpus else settings.image
    container_env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted((env or {}).items())]
    container_env += [
        {"name": "CORNSERVE_NATS_URL", "value": nats_url},
        # The node a task manager runs on, for its logs and for an operator reading `kubectl describe`.
        {"name": "CORNSERVE_K8S_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "CORNSERVE_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    if placement.gpus:
        container_env.append({"name": "CORNSERVE_CUDA_INDEX_MAP", "value": placement.cuda_index_map()})
    volumes: list[dict[str, Any]] = [
        {"name": "shm", "hostPath": {"path": settings.shm_host_path, "type": "Directory"}},
        {"name": "logs", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "shm", "mountPath": SHM_MOUNT},
        {"name": "logs", "mountPath": LOG_MOUNT},
    ]
    copies: list[str] = []
    init_mounts: list[dict[str, Any]] = []
    for role, secret, variable in (
        ("task-manager", settings.nats_creds_secret, "CORNSERVE_NATS_CREDS"),
        ("executor", settings.executor_nats_creds_secret, "CORNSERVE_EXECUTOR_NATS_CREDS"),
    ):
        if secret is None:
            continue
        volume = f"secret-{role}"
        volumes.append({"name": volume, "secret": {"secretName": secret, "defaultMode": 0o440}})
        init_mounts.append({"name": volume, "mountPath": f"{SECRET_SOURCE_DIR}/{role}", "readOnly": True})
        copies.append(f"install -m 0600 {SECRET_SOURCE_DIR}/{role}/{CREDS_KEY} {CREDS_DIR}/{role}.json")
        container_env.append({"name": variable, "value": f"{CREDS_DIR}/{role}.json"})
    init_containers: list[dict[str, Any]] = []
    if copies:
        # Secret volumes are root's files, readable by the pod's fsGroup (0440); Cornserve refuses
        # a credentials file others may read, so an init container copies them, 0600 and owned by
        # the pod's user, into a memory-backed emptyDir (never on the node's disk).
        volumes.append({"name": "credentials", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
        mounts.append({"name": "credentials", "mountPath": CREDS_DIR, "readOnly": True})
        init_containers.append(
            {
                "name": "credentials",
                "image": image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["sh", "-c", " && ".join(["set -e", *copies])],
                "volumeMounts": [*init_mounts, {"name": "credentials", "mountPath": CREDS_DIR}],
                "securityContext": container_security(),
            }
        )
    if settings.models_claim is not None:
        volumes.append(
            {
                "name": "models",
                "persistentVolumeClaim": {"claimName": settings.models_claim, "readOnly": True},
            }
        )
        mounts.append({"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True})

    resources: dict[str, dict[str, str]] = {}
    requests = {k: v for k, v in (("cpu", settings.cpu_request), ("memory", settings.memory_request)) if v}
    if requests:
        resources["requests"] = requests
    if placement.gpus:
        # Extended resources are whole units and may only be limits (requests default to them).
        resources["limits"] = {GPU_RESOURCE: str(placement.gpus)}

    args = [
        "--task-key", task_key,
        "--task-json", json.dumps(task, separators=(",", ":"), sort_keys=True),
        "--nats-url", nats_url,
        "--log-dir", LOG_MOUNT,
        "--log-level", log_level,
    ]  # fmt: skip
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "cornserve.task_manager.main"],
        "args": args,
        "env": container_env,
        "volumeMounts": mounts,
        "securityContext": container_security(),
    }
    if resources:
        container["resources"] = resources

    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": settings.termination_grace_s,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TASK_MANAGER_UID,
            "runAsGroup": TASK_MANAGER_UID,
            "fsGroup": TASK_MANAGER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        spec["initContainers"] = init_containers
    if settings.host_network:
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"  # the NATS Service's name still resolves
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if placement.node is not None:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": settings.node_label, "operator": "In", "values": [placement.node]}
                            ]
                        }
                    ]
                }
            }
        }
    if placement.gpus and settings.gpu_toleration:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]

    annotations = {ANNOTATION_TASK_KEY: task_key}
    if placement.node is not None:
        annotations[ANNOTATION_NODE] = placement.node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": pod_name_prefix(task_key),
            "namespace": settings.namespace,
            "labels": {**selector_labels(settings), LABEL_TASK_KEY_HASH: task_key_hash(task_key)},
            "annotations": annotations,
        },
        "spec": spec,
    }


def label_selector(labels: Mapping[str, str]) -> str:
    """``k=v,k=v``: the API's labelSelector query parameter."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
