"""Fixtures: tiny checkpoints, real sidecar servers and real LLM executor processes.

Executors and sidecars are module-scoped (model loading dominates test time on 2 cores) and
started in parallel; each test talks to them over real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image
from tests.sidecar.conftest import SidecarProc

from cornserve.models.tiny import build_tiny
from cornserve.runtime.process import free_port

ARCHS = ("qwen2-vl", "llava")
_next_rank = iter(range(400, 500))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny seeded checkpoint per supported family."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny(arch, root / arch, seed=0) for arch in ARCHS}


@dataclass
class Executor:
    """One running `python -m cornserve.llm_executor` process."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    sidecar_rank: int | None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def spawn_executor(
    model_dir: Path, log_dir: Path, name: str, nats_url: str, *, sidecar_rank: int | None, extra: list[str]
) -> Executor:
    port = free_port()
    cmd = [
        sys.executable, "-m", "cornserve.llm_executor",
        "--model-id", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-batch-size", "4",
        "--sidecar-ranks", str(sidecar_rank if sidecar_rank is not None else 0),
        *(["--receive-embeddings"] if sidecar_rank is not None else []),
        *extra,
    ]  # fmt: skip
    log_path = log_dir / f"executor-{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    env = {**__import__("os").environ, "CORNSERVE_NATS_URL": nats_url, "CORNSERVE_EXECUTOR_ID": name}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    log.close()
    return Executor(f"http://127.0.0.1:{port}", proc, log_path, sidecar_rank)


def wait_healthy(ex: Executor, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ex.proc.poll() is not None:
            raise RuntimeError(f"executor exited with {ex.proc.returncode}:\n{ex.log()}")
        try:
            with urllib.request.urlopen(ex.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"executor not healthy within {timeout}s:\n{ex.log()}")


def stop_executor(ex: Executor) -> None:
    if ex.proc.poll() is None:
        ex.proc.send_signal(signal.SIGTERM)
        try:
            ex.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ex.proc.kill()
            ex.proc.wait()
            raise AssertionError(f"executor did not exit on SIGTERM:\n{ex.log()}") from None


@dataclass
class Cluster:
    """Per family: a monolithic executor and a fission executor, plus the producer's sidecar rank."""

    models: dict[str, Path]
    monolithic: dict[str, Executor]
    fission: dict[str, Executor]
    producer_rank: int


@pytest.fixture(scope="module")
def cluster(
    tiny_models: dict[str, Path], nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("llm-executor-logs")
    sidecars = [
        SidecarProc(next(_next_rank), "node-a", nats_url, 16 * 1024 * 1024, 300.0, log_dir) for _ in range(3)
    ]
    executors: list[Executor] = []
    try:
        for sc in sidecars:
            sc.spawn()

        async def ready() -> None:
            await asyncio.gather(*(sc.wait_ready() for sc in sidecars))

        asyncio.run(ready())
        producer, *consumers = sidecars
        mono = {}
        fission = {}
        for arch, consumer in zip(ARCHS, consumers, strict=True):
            mono[arch] = spawn_executor(
                tiny_models[arch], log_dir, f"{arch}-mono", nats_url, sidecar_rank=None, extra=[]
            )
            fission[arch] = spawn_executor(
                tiny_models[arch],
                log_dir,
                f"{arch}-fission",
                nats_url,
                sidecar_rank=consumer.rank,
                extra=["--embedding-timeout-s", "3"],
            )
            executors += [mono[arch], fission[arch]]
        for ex in executors:
            wait_healthy(ex)
        yield Cluster(tiny_models, mono, fission, producer.rank)
    finally:
        for ex in executors:
            stop_executor(ex)
        for sc in sidecars:
            sc.stop()
    for ex in executors:
        assert "Traceback" not in ex.log(), f"{ex.log_path.name} logged a traceback:\n{ex.log()}"


# ---------------------------------------------------------------------- request helpers


def png_data_url(seed: int, size: tuple[int, int] = (56, 40)) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_file(path: Path, frames: int = 4, size: tuple[int, int] = (48, 32)) -> Path:
    """A short random-pixel MPEG-4 video."""
    rng = np.random.default_rng(5)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def image_messages(url: str, text: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def post_json(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, Any]:
    """POST and return (status, parsed JSON or raw SSE text)."""
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
            status = resp.status
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read().decode())
    return status, (raw if ctype.startswith("text/event-stream") else json.loads(raw))


def get_json(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read().decode())
