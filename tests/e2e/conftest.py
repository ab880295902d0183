"""A local cluster and tiny checkpoints for the MLLM end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from tests.support.cluster import gateway_session, running_local_cluster
from tests.support.plugin import TinyCheckpoint

from cornserve.cli.launcher import LocalCluster


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: TinyCheckpoint) -> dict[str, Path]:
    """Tiny random checkpoints: Qwen2-VL (two seeds: a second LLM over the same encoder) and LLaVA."""
    return {
        "qwen": tiny_checkpoint("qwen2-vl", seed=0),
        "qwen-b": tiny_checkpoint("qwen2-vl", seed=1),
        "llava": tiny_checkpoint("llava", seed=0),
    }


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one directory the cluster's executors may read `file:` media from."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def mllm_cluster(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> Iterator[LocalCluster]:
    """Four CPU slots: enough for one family's encoder, its two LLMs and a second LLM.

    `CORNSERVE_MEDIA_DIRS` is set as an operator sets it for `cornserve up`: every process inherits
    it, down to the executors the task managers start.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CORNSERVE_MEDIA_DIRS", str(media_dir))
        with running_local_cluster(tmp_path_factory.mktemp("mllm-cluster"), cpu_slots=4) as cluster:
            yield cluster


@pytest.fixture
async def gateway(mllm_cluster: LocalCluster) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session on the cluster's gateway (deploying executors on 2 cores takes a while)."""
    async with gateway_session(mllm_cluster, timeout_s=600) as session:
        yield session
