"""The vLLM launch path: command lines, request translation, and the embedding proxy.

vLLM itself cannot be installed here (no GPU); the proxy's tests run it against a stand-in `vllm`
executable (fake_vllm.py) that decodes the embeddings exactly as vLLM's chat server does. What
crosses the sidecar is real.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import torch
from tests.support.plugin import StartSidecars
from tests.support.processes import ServiceProcess, python_module
from tests.support.waiting import wait_healthy

from cornserve.runtime.process import free_port
from cornserve.sidecar import Sidecar
from cornserve.task.builtins.embedding import (
    EMBEDDING_META_CHUNK,
    EMBEDDING_NUM_CHUNKS,
    EMBEDDING_TENSOR_CHUNK,
    EmbeddingMeta,
)
from cornserve.vllm import (
    EmbeddingTranslationError,
    ReceivedEmbedding,
    VLLMServeArgs,
    rewrite_request,
    vllm_serve_command,
)

HERE = Path(__file__).parent


def _load_b64(b64: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True)


def test_vllm_serve_command() -> None:
    args = VLLMServeArgs(
        model="Qwen/Qwen2-VL-2B-Instruct", port=9000, tensor_parallel_size=2, max_model_len=4096,
        enable_mm_embeds=True, extra_args=["--enforce-eager"],
    )  # fmt: skip
    command = vllm_serve_command(args)
    assert command[:3] == ["vllm", "serve", "Qwen/Qwen2-VL-2B-Instruct"]
    joined = " ".join(command)
    assert (
        "--port 9000" in joined and "--tensor-parallel-size 2" in joined and "--max-model-len 4096" in joined
    )
    assert "--enable-mm-embeds" in command and command[-1] == "--enforce-eager"
    assert "--enable-mm-embeds" not in vllm_serve_command(args.model_copy(update={"enable_mm_embeds": False}))


def _request() -> dict[str, object]:
    return {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "file:///a.png"}},
                    {"type": "text", "text": "compare"},
                    {"type": "image_url", "image_url": {"url": "file:///b.png"}},
                ],
            },
        ],
        "cornserve_embeddings": [{"id": "x"}, {"id": "y"}],
    }


def test_rewrite_request_replaces_media_in_order() -> None:
    a = ReceivedEmbedding(
        tensor=torch.ones(4, 8), meta=EmbeddingMeta(modality="image", num_tokens=4, grid_thw=[1, 4, 4])
    )
    b = ReceivedEmbedding(tensor=torch.full((2, 8), 2.0), meta=EmbeddingMeta(modality="image", num_tokens=2))
    out = rewrite_request(_request(), [a, b])
    assert "cornserve_embeddings" not in out
    parts = out["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["image_embeds", "text", "image_embeds"]
    first = parts[0]["image_embeds"]
    assert torch.equal(_load_b64(first["image_embeds"]), a.tensor)
    assert _load_b64(first["image_grid_thw"]).tolist() == [1, 4, 4]
    assert torch.equal(_load_b64(parts[2]["image_embeds"]), b.tensor)
    assert out["messages"][0] == {"role": "system", "content": "be brief"}


def test_rewrite_request_errors() -> None:
    one = ReceivedEmbedding(tensor=torch.ones(4, 8), meta=EmbeddingMeta(modality="image", num_tokens=4))
    with pytest.raises(EmbeddingTranslationError, match="no embedding is left"):
        rewrite_request(_request(), [one])
    with pytest.raises(EmbeddingTranslationError, match="left over"):
        rewrite_request(_request(), [one, one, one])
    video = ReceivedEmbedding(tensor=torch.ones(4, 8), meta=EmbeddingMeta(modality="video", num_tokens=4))
    with pytest.raises(EmbeddingTranslationError, match="is image media but its embedding is video"):
        rewrite_request(_request(), [video, one])
    bad = ReceivedEmbedding(tensor=torch.ones(3, 8), meta=EmbeddingMeta(modality="image", num_tokens=4))
    with pytest.raises(EmbeddingTranslationError, match="does not match its 4 tokens"):
        rewrite_request(_request(), [bad, one])


async def test_proxy_feeds_sidecar_embeddings_to_vllm(
    sidecars: StartSidecars,
    nats_url: str,
    tmp_path: Path,
) -> None:
    src, dst = await sidecars(2)
    fake = tmp_path / "vllm"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_vllm.py"} "$@"\n')
    fake.chmod(0o755)
    port = free_port()
    proxy = ServiceProcess.start(
        "proxy",
        python_module(
            "cornserve.vllm", "--model-id", "tiny-qwen", "--port", str(port),
            "--sidecar-ranks", str(dst.rank), "--vllm-executable", str(fake), "--embedding-timeout", "5",
            "--", "--enforce-eager",
        ),
        tmp_path,
        {"CORNSERVE_NATS_URL": nats_url},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_healthy, url, process=proxy, timeout=90)
        embedding = torch.arange(24, dtype=torch.float32).reshape(3, 8)
        async with Sidecar(src.rank, nats_url) as sender:
            await sender.send(
                embedding,
                "fwd-1",
                [[dst.rank]],
                chunk_id=EMBEDDING_TENSOR_CHUNK,
                num_chunks=EMBEDDING_NUM_CHUNKS,
            )
            meta = EmbeddingMeta(modality="image", num_tokens=3, grid_thw=[1, 2, 6], model_id="tiny-qwen")
            await sender.send(
                meta.model_dump(mode="json"),
                "fwd-1",
                [[dst.rank]],
                chunk_id=EMBEDDING_META_CHUNK,
                num_chunks=EMBEDDING_NUM_CHUNKS,
            )
        body = {
            "model": "tiny-qwen",
            "stream": True,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "file:///x.png"}},
                        {"type": "text", "text": "what is it"},
                    ],
                }
            ],
            "cornserve_embeddings": [{"id": "fwd-1", "dst_sidecar_ranks": [[dst.rank]]}],
        }
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
                lines = [line.decode().strip() async for line in response.content if line.strip()]
            assert lines[-1] == "data: [DONE]"
            chunk = json.loads(lines[0][len("data:") :])
            report = json.loads(chunk["choices"][0]["delta"]["content"])
            assert report["embeds"] == [
                {"shape": [3, 8], "sum": float(embedding.sum()), "grid_thw": [1, 2, 6]}
            ]
            assert "--enable-mm-embeds" in report["flags"] and "--enforce-eager" in report["flags"]

            # An embedding that never arrives: a prompt 504 naming the problem; the proxy stays up.
            body["cornserve_embeddings"] = [{"id": "never-sent"}]
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 504
                assert "did not arrive" in (await response.json())["error"]["message"]
            async with session.post(url + "/v1/chat/completions", data=b"{not json") as response:
                assert response.status == 400
            async with session.get(url + "/health") as response:
                assert response.status == 200
    finally:
        code = proxy.stop(timeout=40)
    assert code == 0, proxy.log()
    stray = subprocess.run(["pgrep", "-f", str(HERE / "fake_vllm.py")], capture_output=True, text=True)
    assert stray.stdout.strip() == "", "the proxy left vLLM running"


async def test_proxy_exits_1_when_vllm_dies(sidecars: StartSidecars, nats_url: str, tmp_path: Path) -> None:
    """vLLM exiting ends the proxy (through the runtime's stop, exit code 1) so the task manager restarts it."""
    (dst,) = await sidecars(1)
    dying = tmp_path / "vllm"
    dying.write_text("#!/bin/sh\nsleep 1\nexit 3\n")
    dying.chmod(0o755)
    proxy = ServiceProcess.start(
        "proxy-dying",
        python_module(
            "cornserve.vllm", "--model-id", "tiny-qwen", "--port", str(free_port()),
            "--sidecar-ranks", str(dst.rank), "--vllm-executable", str(dying),
        ),
        tmp_path,
        {"CORNSERVE_NATS_URL": nats_url},
    )  # fmt: skip
    code = await asyncio.to_thread(proxy.wait_exit, 60)  # kills it and fails past the deadline
    assert code == 1, proxy.log()
    assert "vLLM exited with code 3" in proxy.log()
