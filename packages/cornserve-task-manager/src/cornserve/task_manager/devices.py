"""Device indices as an executor sees them: node-wide, or renumbered inside a Kubernetes pod.

The resource manager numbers a node's GPUs 0..N-1 across the node. A task manager that runs as a
Kubernetes pod with ``nvidia.com/gpu: K`` sees only the K GPUs the device plugin gave it, numbered
0..K-1, so an executor told "cuda:2" would address a GPU the pod does not have. The `kubernetes`
spawner therefore sets ``CORNSERVE_CUDA_INDEX_MAP`` ("2:0,3:1": node-wide index to pod index) for
the devices the pod was created with; without the variable, indices pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from cornserve.bus.control import DeviceInfo
from cornserve.task import Device

CUDA_INDEX_MAP_ENV = "CORNSERVE_CUDA_INDEX_MAP"


class DeviceMapError(ValueError):
    """The index map is malformed, or an executor's GPU is not one of this pod's."""


def parse_index_map(text: str) -> dict[int, int]:
    """``"2:0,3:1"`` → ``{2: 0, 3: 1}``; a typed error naming the variable for anything else."""
    mapping: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        node_index, sep, pod_index = part.partition(":")
        if not sep or not node_index.strip().isdigit() or not pod_index.strip().isdigit():
            raise DeviceMapError(f"{CUDA_INDEX_MAP_ENV}={text!r}: expected NODE:POD pairs like 2:0,3:1")
        mapping[int(node_index)] = int(pod_index)
    if len(set(mapping.values())) != len(mapping):
        raise DeviceMapError(f"{CUDA_INDEX_MAP_ENV}={text!r}: two GPUs map to one pod index")
    return mapping


def executor_devices(devices: Sequence[DeviceInfo], environ: Mapping[str, str] | None = None) -> list[Device]:
    """The devices to hand an executor: CUDA indices renumbered when this is a pod with a map."""
    env = os.environ if environ is None else environ
    text = env.get(CUDA_INDEX_MAP_ENV)
    mapping = parse_index_map(text) if text else None
    out = []
    for d in devices:
        index = d.index
        if d.kind == "cuda" and mapping is not None:
            if d.index not in mapping:
                raise DeviceMapError(
                    f"GPU {d.index} of node {d.node} is not one of this pod's ({', '.join(map(str, sorted(mapping)))}): "
                    "a task-manager pod's GPUs are fixed when it is created"
                )
            index = mapping[d.index]
        out.append(Device(kind=d.kind, index=index))
    return out
