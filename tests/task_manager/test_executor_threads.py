"""An executor on CPU slots runs as many compute threads as it has slots, whatever its descriptor.

torch (like any OpenMP library) starts one compute thread per core of the machine unless
`OMP_NUM_THREADS` says otherwise. The CPU LLM executor's and Eric's descriptors never set it, so
in a cluster every such executor ran one spinning thread per core of the node, however many CPU
slots it was given (and the LLM executor's one-thread decode path never applied). The task
manager now sets it from the placement for every descriptor; a descriptor's own value still wins.
These tests start real processes through `ManagedExecutor.launch` and read their environment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.support.tasklib_tensor_math import MakeMatrix, MakeMatrixExecutor

from cornserve.bus.control import DeviceInfo
from cornserve.runtime.process import ProcessGroup
from cornserve.task import ExecutorLaunchSpec, ExecutorPlacement, UnitTask
from cornserve.task_manager.executor import ManagedExecutor

READ_TIMEOUT_S = 30.0


def cpu_slots(count: int) -> list[DeviceInfo]:
    return [DeviceInfo(kind="cpu", index=i, sidecar_rank=i) for i in range(count)]


def launched_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: list[DeviceInfo], spec_env: dict[str, str]
) -> str:
    """Launch a process that writes its `OMP_NUM_THREADS` (or "unset") to a file; return what it wrote."""
    out = tmp_path / "threads.txt"
    script = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(out)!r}).write_text(os.environ.get('OMP_NUM_THREADS', 'unset'))\n"
        "time.sleep(60)\n"
    )

    def spec(self: Any, task: UnitTask[Any, Any], placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        return ExecutorLaunchSpec(command=[sys.executable, "-c", script], env=spec_env, port=placement.port)

    monkeypatch.setattr(MakeMatrixExecutor, "launch_spec", spec)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the task manager's own value must not reach the executor
    ex = ManagedExecutor(executor_id="ex-threads", devices=devices, log_path=tmp_path / "ex.log")
    ex.launch(MakeMatrix(descriptor=MakeMatrixExecutor()), "nats://127.0.0.1:4222")
    assert isinstance(ex.proc, ProcessGroup)
    try:
        deadline = time.monotonic() + READ_TIMEOUT_S
        while not out.exists() or not out.read_text():
            assert time.monotonic() < deadline, (
                f"the executor wrote nothing in {READ_TIMEOUT_S}s: {ex.exited()}"
            )
            assert ex.exited() is None, (tmp_path / "ex.log").read_text()
            time.sleep(0.05)
        return out.read_text()
    finally:
        ex.proc.stop(5.0)


@pytest.mark.parametrize("slots", [1, 2])
def test_an_executor_on_cpu_slots_gets_one_thread_per_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slots: int
) -> None:
    assert launched_threads(tmp_path, monkeypatch, cpu_slots(slots), {}) == str(slots)


def test_a_descriptors_own_value_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert launched_threads(tmp_path, monkeypatch, cpu_slots(2), {"OMP_NUM_THREADS": "3"}) == "3"


def test_gpus_and_no_devices_set_nothing() -> None:
    from cornserve.task import Device

    def placement(devices: list[Device]) -> ExecutorPlacement:
        return ExecutorPlacement(executor_id="e", port=1, devices=devices, sidecar_ranks=[])

    assert placement([Device(kind="cuda", index=0)]).cpu_threads_env() == {}
    assert placement([]).cpu_threads_env() == {}
    assert placement([Device(kind="cpu", index=0), Device(kind="cpu", index=3)]).cpu_threads_env() == {
        "OMP_NUM_THREADS": "2"
    }
