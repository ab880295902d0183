"""Fixtures: tiny checkpoints, real sidecar servers and real LLM executor processes.

Executors and sidecars are module-scoped (model loading dominates test time on 2 cores) and
started in parallel; each test talks to them over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.llm_executor.support import ARCHS, TEST_DEVICE, LLMExecutor, LLMExecutorSetup
from tests.support.cluster import ProcessCluster
from tests.support.plugin import TinyCheckpoint
from tests.support.processes import python_module
from tests.support.sidecars import LLM_EXECUTOR_RANKS, MiB
from tests.support.waiting import wait_healthy

from cornserve.runtime.process import free_port


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoint: TinyCheckpoint) -> dict[str, Path]:
    """One tiny seeded checkpoint per supported family."""
    return {arch: tiny_checkpoint(arch) for arch in ARCHS}


def start_executor(
    cluster: ProcessCluster, model_dir: Path, name: str, *, sidecar_rank: int | None, extra: list[str]
) -> LLMExecutor:
    port = free_port()
    cmd = python_module(
        "cornserve.llm_executor",
        "--model-id", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-batch-size", "4",
        "--sidecar-ranks", str(sidecar_rank if sidecar_rank is not None else 0),
        *(["--receive-embeddings"] if sidecar_rank is not None else []),
        "--device", TEST_DEVICE,
        *extra,
    )  # fmt: skip
    env = {"CORNSERVE_NATS_URL": cluster.nats_url, "CORNSERVE_EXECUTOR_ID": name}
    service = cluster.start_service(f"executor-{name}", cmd, env)
    return LLMExecutor(f"http://127.0.0.1:{port}", service, sidecar_rank)


@pytest.fixture(scope="module")
def cluster(
    tiny_models: dict[str, Path], nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LLMExecutorSetup]:
    log_dir = tmp_path_factory.mktemp("llm-executor-logs")
    # file: media may come from the tests' temporary directories (and nowhere else).
    media = ["--media-dirs", str(tmp_path_factory.getbasetemp())]
    with ProcessCluster(log_dir, nats_url, LLM_EXECUTOR_RANKS) as cluster:
        producer, *consumers = cluster.start_sidecars(3, arena_bytes=16 * MiB, ttl_s=300.0)
        mono = {}
        fission = {}
        for arch, consumer in zip(ARCHS, consumers, strict=True):
            mono[arch] = start_executor(
                cluster, tiny_models[arch], f"{arch}-mono", sidecar_rank=None, extra=media
            )
            fission[arch] = start_executor(
                cluster,
                tiny_models[arch],
                f"{arch}-fission",
                sidecar_rank=consumer.rank,
                extra=["--embedding-timeout-s", "3", *media],
            )
        executors = [*mono.values(), *fission.values()]
        for ex in executors:
            wait_healthy(ex.url, process=ex.service)
        yield LLMExecutorSetup(tiny_models, mono, fission, producer.rank)
    for ex in executors:
        assert "Traceback" not in ex.log(), f"{ex.service.log_path.name} logged a traceback:\n{ex.log()}"
