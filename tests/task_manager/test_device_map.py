"""Executors in a Kubernetes pod get the pod's GPU numbering (CORNSERVE_CUDA_INDEX_MAP); elsewhere, the node's."""

from __future__ import annotations

import pytest

from cornserve.bus.control import DeviceInfo
from cornserve.task import Device
from cornserve.task_manager.devices import DeviceMapError, executor_devices, parse_index_map

GPUS = [DeviceInfo(kind="cuda", index=i, sidecar_rank=i, node="gpu-7") for i in (2, 3)]


def test_without_a_map_indices_pass_through() -> None:
    assert executor_devices(GPUS, {}) == [Device(kind="cuda", index=2), Device(kind="cuda", index=3)]


def test_a_map_renumbers_gpus_not_cpu_slots() -> None:
    env = {"CORNSERVE_CUDA_INDEX_MAP": "2:0,3:1"}
    assert executor_devices(GPUS, env) == [Device(kind="cuda", index=0), Device(kind="cuda", index=1)]
    cpu = [DeviceInfo(kind="cpu", index=5, sidecar_rank=5)]
    assert executor_devices(cpu, env) == [Device(kind="cpu", index=5)]


def test_a_gpu_outside_the_pod_is_a_clear_error() -> None:
    with pytest.raises(DeviceMapError, match="GPU 3 of node gpu-7 is not one of this pod's"):
        executor_devices(GPUS, {"CORNSERVE_CUDA_INDEX_MAP": "2:0"})


@pytest.mark.parametrize("text", ["2", "a:0", "2:0,3:0", "2:-1"])
def test_a_malformed_map_is_refused(text: str) -> None:
    with pytest.raises(DeviceMapError, match="CORNSERVE_CUDA_INDEX_MAP"):
        parse_index_map(text)
