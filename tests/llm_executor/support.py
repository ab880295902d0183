"""Handles and request helpers of the LLM executor tests (fixtures are in conftest.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image
from tests.support.processes import ServiceProcess

ARCHS = ("qwen2-vl", "llava")
TEST_DEVICE = os.environ.get("CORNSERVE_TEST_LLM_DEVICE", "cpu")
"""Where the executors under test run (`--device`); bench/gpu_check.py sets cuda:0. The reference
stays on the CPU, so a GPU run shows the same tokens as the CPU."""


@dataclass
class LLMExecutor:
    """One running `python -m cornserve.llm_executor` process."""

    url: str
    service: ServiceProcess
    sidecar_rank: int | None

    def log(self) -> str:
        return self.service.log()


@dataclass
class LLMExecutorSetup:
    """Per family: a monolithic executor and a fission executor, plus the producer's sidecar rank."""

    models: dict[str, Path]
    monolithic: dict[str, LLMExecutor]
    fission: dict[str, LLMExecutor]
    producer_rank: int


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
