"""Fixtures: the tensor-math library uploaded to KV, four sidecars, and one executor per unit task."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from tests.executor.support import ExecutorSetup, LaunchedExecutor, launch_executor
from tests.support.cluster import ProcessCluster
from tests.support.sidecars import EXECUTOR_RANKS, MiB
from tests.support.tasklibs import TENSOR_MATH, upload_library


@pytest.fixture(scope="session")
def tensor_math() -> ModuleType:
    """The task library, loaded into the test process exactly as services load it."""
    return TENSOR_MATH.load()


@pytest.fixture(scope="package")
def cluster(
    nats_url: str, tensor_math: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExecutorSetup]:
    """Sidecars and executors shared by this package's test modules (starting torch processes is slow)."""
    asyncio.run(upload_library(nats_url, TENSOR_MATH))
    lib = tensor_math
    tasks: list[Any] = [
        lib.MakeMatrix(), lib.MatMul(), lib.Reduce(), lib.RowSums(), lib.StreamRows(), lib.SumRows()
    ]  # fmt: skip
    executors: dict[str, LaunchedExecutor] = {}
    with ProcessCluster(tmp_path_factory.mktemp("executors"), nats_url, EXECUTOR_RANKS) as cluster:
        sidecars = cluster.start_sidecars(len(tasks), arena_bytes=32 * MiB)
        try:
            for task, sidecar in zip(tasks, sidecars, strict=True):
                name = type(task).__name__
                executors[name] = launch_executor(
                    task, f"{name.lower()}-0", [sidecar.rank], nats_url, cluster.log_dir
                )
            for executor in executors.values():
                executor.wait_ready()
            yield ExecutorSetup(cluster, lib, sidecars, executors)
        finally:
            codes = {name: e.stop() for name, e in executors.items()}
    assert all(code == 0 for code in codes.values()), f"executors exited with {codes}"
    for executor in executors.values():
        assert "stopped" in executor.log(), executor.log()
    cluster.assert_sidecars_clean()
