"""Real processes for Eric's tests: tiny checkpoints, sidecar servers and Eric servers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.eric.support import Cluster, Eric, Proc, next_rank, spawn, wait_healthy, wait_sidecar

from cornserve.models.tiny import build_tiny
from cornserve.runtime.process import free_port


@pytest.fixture(scope="session")
def eric_cluster(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Sidecars + three Erics (qwen2-vl image, qwen2-vl video, llava image) + one that must fail to start."""
    root = tmp_path_factory.mktemp("eric")
    logs = root / "logs"
    logs.mkdir()
    ckpt = {arch: build_tiny(arch, root / arch, seed=0) for arch in ("qwen2-vl", "llava")}
    specs = {
        "qwen-image": ("qwen2-vl", "image", 2),
        "qwen-video": ("qwen2-vl", "video", 4),
        "llava-image": ("llava", "image", 4),
    }
    sidecar_bin = str(Path(sys.executable).parent / "cornserve-sidecar")
    ranks = [next_rank() for _ in range(len(specs) + 2)]
    sidecars = []
    for r in ranks:
        cmd = [sidecar_bin, "--rank", str(r), "--node", "node-eric", "--nats-url", nats_url]
        sidecars.append(spawn(f"sidecar-{r}", [*cmd, "--arena-bytes", str(64 << 20)], logs))
    procs: list[Proc] = []
    try:
        for p, r in zip(sidecars, ranks, strict=True):
            wait_sidecar(p, nats_url, r)
        env = {"CORNSERVE_NATS_URL": nats_url, "HF_HUB_OFFLINE": "1"}
        erics: dict[str, Eric] = {}
        for (name, (arch, modality, batch)), rank in zip(specs.items(), ranks[1:], strict=False):
            port = free_port()
            cmd = [
                sys.executable, "-m", "cornserve.eric",
                "--model-id", str(ckpt[arch]),
                "--modality", modality,
                "--max-batch-size", str(batch),
                "--tensor-parallel-size", "1",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--sidecar-ranks", str(rank),
            ]  # fmt: skip
            proc = spawn(name, cmd, logs, env | {"CORNSERVE_EXECUTOR_ID": name})
            procs.append(proc)
            erics[name] = Eric(proc, f"http://127.0.0.1:{port}", ckpt[arch], rank)
        bad_cmd = [
            sys.executable, "-m", "cornserve.eric", "--model-id", str(ckpt["llava"]), "--modality", "video",
            "--max-batch-size", "1", "--tensor-parallel-size", "1", "--host", "127.0.0.1",
            "--port", str(free_port()), "--sidecar-ranks", str(ranks[-1]),
        ]  # fmt: skip
        failed = spawn("llava-video", bad_cmd, logs, env)
        procs.append(failed)
        wait_healthy(list(erics.values()))
        yield Cluster(nats_url, ranks[0], erics, failed, logs)
        for e in erics.values():
            code = e.proc.stop()
            log = e.proc.log()
            assert code == 0, f"{e.proc.name} exited with {code} on SIGTERM:\n{log}"
            assert "Traceback" not in log, f"{e.proc.name} logged a traceback:\n{log}"
            assert "stopped" in log
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        for p in sidecars:
            p.stop()
