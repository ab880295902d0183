"""Fixtures: the tensor-math library uploaded to KV, four sidecars, and one executor per unit task."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tests.executor.cluster import (
    LIBRARY_NAME,
    Executor,
    SidecarServer,
    launch_executor,
    library_source,
    upload_library,
)

from cornserve.task.library import load_task_library

_ranks = itertools.count(300)  # tests/sidecar use 100+, tests/eric 500+, tests/llm_executor 400-499


@pytest.fixture(scope="session")
def tensor_math() -> ModuleType:
    """The task library, loaded into the test process exactly as services load it."""
    return load_task_library(LIBRARY_NAME, library_source()).module


@dataclass
class Cluster:
    nats_url: str
    log_dir: Path
    lib: ModuleType
    sidecars: list[SidecarServer]
    executors: dict[str, Executor]  # by task class name

    def by_key(self) -> dict[str, Executor]:
        return {e.task.deployment_key: e for e in self.executors.values()}

    def new_rank(self) -> int:
        return next(_ranks)


@pytest.fixture(scope="module")
def cluster(
    nats_url: str, tensor_math: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """Sidecars and executors that live for the whole test module (starting torch processes is slow)."""
    log_dir = tmp_path_factory.mktemp("executors")
    asyncio.run(upload_library(nats_url, LIBRARY_NAME, library_source()))
    lib = tensor_math
    tasks: list[Any] = [lib.MakeMatrix(), lib.MatMul(), lib.Reduce(), lib.RowSums()]
    sidecars = [SidecarServer(next(_ranks), nats_url, log_dir) for _ in tasks]
    executors: dict[str, Executor] = {}
    try:

        async def sidecars_ready() -> None:
            await asyncio.gather(*(s.wait_ready() for s in sidecars))

        asyncio.run(sidecars_ready())
        for task, sidecar in zip(tasks, sidecars, strict=True):
            name = type(task).__name__
            executors[name] = launch_executor(task, f"{name.lower()}-0", [sidecar.rank], nats_url, log_dir)
        for executor in executors.values():
            executor.wait_healthy()
        yield Cluster(nats_url, log_dir, lib, sidecars, executors)
    finally:
        codes = {name: e.stop() for name, e in executors.items()}
        for s in sidecars:
            s.stop()
    assert all(code == 0 for code in codes.values()), f"executors exited with {codes}"
    for executor in executors.values():
        assert "stopped" in executor.log(), executor.log()
    for s in sidecars:
        log = s.log_path.read_text()
        assert "Traceback" not in log, f"sidecar {s.rank} logged a traceback:\n{log}"
