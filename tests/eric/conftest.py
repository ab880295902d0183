"""Real processes for Eric's tests: tiny checkpoints, sidecar servers and Eric servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.eric.support import Eric, EricSetup
from tests.support.cluster import ProcessCluster
from tests.support.plugin import TinyCheckpoint
from tests.support.processes import python_module
from tests.support.sidecars import ERIC_RANKS
from tests.support.waiting import wait_healthy

from cornserve.runtime.process import free_port

STARTUP_DEADLINE_S = 180.0


def eric_command(model_dir: str, modality: str, batch: int, port: int, rank: int) -> list[str]:
    return python_module(
        "cornserve.eric",
        "--model-id", model_dir,
        "--modality", modality,
        "--max-batch-size", str(batch),
        "--tensor-parallel-size", "1",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--sidecar-ranks", str(rank),
    )  # fmt: skip


@pytest.fixture(scope="module")
def eric_cluster(
    nats_url: str, tiny_checkpoint: TinyCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EricSetup]:
    """Sidecars + three Erics (qwen2-vl image, qwen2-vl video, llava image) + one that must fail to start."""
    ckpt = {arch: tiny_checkpoint(arch) for arch in ("qwen2-vl", "llava")}
    # (checkpoint, modality, max batch size, torch threads): one thread is what a cluster gives an
    # Eric on one CPU slot, where short work runs on the event loop (cornserve.models.inline).
    specs = {
        "qwen-image": ("qwen2-vl", "image", 2, 1),
        "qwen-video": ("qwen2-vl", "video", 4, 2),
        "llava-image": ("llava", "image", 4, 2),
    }
    with ProcessCluster(tmp_path_factory.mktemp("eric"), nats_url, ERIC_RANKS) as cluster:
        sidecars = cluster.start_sidecars(len(specs) + 2, nodes=["node-eric"] * (len(specs) + 2))
        ranks = [s.rank for s in sidecars]
        env = {
            "CORNSERVE_NATS_URL": nats_url,
            "HF_HUB_OFFLINE": "1",
            # file: media may come from the tests' temporary directories (and nowhere else).
            "CORNSERVE_MEDIA_DIRS": str(tmp_path_factory.getbasetemp()),
        }
        erics: dict[str, Eric] = {}
        for (name, (arch, modality, batch, threads)), rank in zip(specs.items(), ranks[1:], strict=False):
            port = free_port()
            cmd = eric_command(str(ckpt[arch]), modality, batch, port, rank)
            own_env = {"CORNSERVE_EXECUTOR_ID": name, "OMP_NUM_THREADS": str(threads)}
            service = cluster.start_service(name, cmd, env | own_env)
            erics[name] = Eric(service, f"http://127.0.0.1:{port}", ckpt[arch], rank)
        bad_cmd = eric_command(str(ckpt["llava"]), "video", 1, free_port(), ranks[-1])
        failed = cluster.start_service("llava-video", bad_cmd, env)
        for e in erics.values():
            wait_healthy(e.url, process=e.service, timeout=STARTUP_DEADLINE_S)
        yield EricSetup(nats_url, ranks[0], erics, failed)
        for e in erics.values():
            e.service.stop(timeout=60)
            e.service.assert_clean_exit()
