"""A local cluster and tiny checkpoints for the MLLM end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from tests.support.cluster import running_cluster

from cornserve.cli.launcher import LocalCluster


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random checkpoints: Qwen2-VL (two seeds: a second LLM over the same encoder) and LLaVA."""
    from cornserve.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("models")
    return {
        "qwen": build_tiny("qwen2-vl", root / "qwen", seed=0),
        "qwen-b": build_tiny("qwen2-vl", root / "qwen-b", seed=1),
        "llava": build_tiny("llava", root / "llava", seed=0),
    }


@pytest.fixture(scope="module")
def mllm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Four CPU slots: enough for one family's encoder, its two LLMs and a second LLM."""
    with running_cluster(tmp_path_factory.mktemp("mllm-cluster")) as cluster:
        yield cluster


@pytest.fixture
async def gateway(mllm_cluster: LocalCluster) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP session on the cluster's gateway (deploying executors on 2 cores takes a while)."""
    async with aiohttp.ClientSession(
        base_url=mllm_cluster.url, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        yield session
