"""The `kubernetes` spawner's node inventory, as pure functions of Node objects (dicts) and settings.

The resource manager places executors on devices, each served by one sidecar; on Kubernetes the
sidecars are the DaemonSet of deploy/k8s/sidecars.yaml, so the inventory must describe exactly the
devices it serves, the way `cornserve.resource_manager.devices.discover_devices` describes one
machine's:

- **Which nodes**: the Nodes whose labels match `KubernetesSettings.node_selector` and that have an
  entry in the ConfigMap `cornserve-sidecar-ranks` (the DaemonSet's source of ranks: a node
  without one runs no sidecars). A node's Cornserve id is its `node_label` value (the label its
  task-manager pods are pinned by; `kubernetes.io/hostname`, the node's name, by default).
- **Its devices**: with `--device-kind auto` or `cuda`, the node's allocatable `nvidia.com/gpu`
  GPUs (`cuda` 0..K-1; memory from the `nvidia.com/gpu.memory` label, MiB, that NVIDIA's GPU
  feature discovery sets, where present); otherwise (or on a node without GPUs) `--cpu-slots` CPU
  slots, at most its allocatable whole CPUs. `--cpu-slots` is the DaemonSet's
  `CORNSERVE_SIDECARS_PER_NODE` (tests/k8s checks they agree).
- **Its ranks**: the ConfigMap's first rank of the node, plus the device's index.
- **Up**: its `Ready` condition is `True` and it is not cordoned (`spec.unschedulable`).

Kubernetes answers are input from the network: a value that does not parse makes that node
unusable (logged), never the resource manager fail.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cornserve.bus.control import DeviceInfo
from cornserve.resource_manager.k8s_pods import GPU_RESOURCE, KubernetesSettings

logger = logging.getLogger(__name__)

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
"""GPU feature discovery's label: one GPU's memory in MiB."""
DeviceKind = Literal["auto", "cuda", "cpu"]
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|Ki|Mi|Gi)?$")
_SUFFIX = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3}


class NodeError(ValueError):
    """A Node object (or the ranks ConfigMap) that does not say what the inventory needs."""


def quantity(value: object) -> float:
    """A Kubernetes resource quantity ("8", "7500m", "2Ki") as a number; NodeError otherwise."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise NodeError(f"{value!r} is not a resource quantity")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


@dataclass(frozen=True)
class NodeView:
    """What the inventory reads of one Node."""

    name: str
    """`metadata.name` (the key of the ranks ConfigMap)."""
    node_id: str
    """The Cornserve node id: the value of `node_label`."""
    gpus: int
    cpus: int
    """Whole allocatable CPUs."""
    gpu_memory_bytes: int | None
    up: bool


def node_view(node: Mapping[str, Any], settings: KubernetesSettings) -> NodeView:
    """Read one Node object (as the API returns it); NodeError if a field the inventory needs is bad."""
    meta = node.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise NodeError("a Node without metadata.name")
    name = meta["name"]
    labels = meta.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise NodeError(f"node {name}: metadata.labels is not a map")
    node_id = labels.get(settings.node_label, name)
    status = node.get("status")
    status = status if isinstance(status, Mapping) else {}
    allocatable = status.get("allocatable") or {}
    if not isinstance(allocatable, Mapping):
        raise NodeError(f"node {name}: status.allocatable is not a map")
    try:
        gpus = int(quantity(allocatable.get(GPU_RESOURCE, "0")))
        cpus = math.floor(quantity(allocatable.get("cpu", "0")))
        memory = labels.get(GPU_MEMORY_LABEL)
        gpu_memory = int(quantity(memory) * 1024**2) if memory is not None else None
    except NodeError as exc:
        raise NodeError(f"node {name}: {exc}") from None
    conditions = status.get("conditions") or []
    if not isinstance(conditions, list):
        raise NodeError(f"node {name}: status.conditions is not a list")
    ready = any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )
    spec = node.get("spec") or {}
    cordoned = isinstance(spec, Mapping) and spec.get("unschedulable") is True
    return NodeView(name, str(node_id), gpus, cpus, gpu_memory, ready and not cordoned)


def first_ranks(data: Mapping[str, Any] | None) -> dict[str, int]:
    """The ranks ConfigMap's data: node name -> its first sidecar rank."""
    ranks: dict[str, int] = {}
    for name, value in (data or {}).items():
        try:
            rank = int(str(value).strip())
        except ValueError:
            raise NodeError(f"ConfigMap entry {name}: {value!r} is not a sidecar rank") from None
        if rank < 0:
            raise NodeError(f"ConfigMap entry {name}: sidecar rank {rank} is negative")
        ranks[name] = rank
    return ranks


def inventory(
    nodes: Sequence[NodeView], ranks: Mapping[str, int], kind: DeviceKind, cpu_slots: int
) -> list[DeviceInfo]:
    """Every device the sidecar DaemonSet serves, in node-name order; ranks unique (NodeError if not)."""
    devices: list[DeviceInfo] = []
    for view in sorted(nodes, key=lambda v: v.name):
        base = ranks.get(view.name)
        if base is None:
            logger.warning(
                "node %s has no first sidecar rank in the ranks ConfigMap: it runs no sidecars and is "
                "left out of the inventory",
                view.name,
            )
            continue
        if view.gpus and kind in ("auto", "cuda"):
            devices += [
                DeviceInfo(
                    kind="cuda",
                    index=i,
                    sidecar_rank=base + i,
                    node=view.node_id,
                    memory_bytes=view.gpu_memory_bytes,
                )
                for i in range(view.gpus)
            ]
        elif kind != "cuda":
            slots = min(cpu_slots, view.cpus)
            devices += [
                DeviceInfo(kind="cpu", index=i, sidecar_rank=base + i, node=view.node_id)
                for i in range(slots)
            ]
    ranks_used = [d.sidecar_rank for d in devices]
    if len(set(ranks_used)) != len(ranks_used):
        raise NodeError(
            "two nodes' sidecar ranks overlap (each node's first rank in the ranks ConfigMap must leave "
            f"room for its devices): {sorted(ranks_used)}"
        )
    return devices
