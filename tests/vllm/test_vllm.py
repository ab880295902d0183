"""The vLLM launch path: command lines, request translation, and the embedding proxy.

vLLM itself cannot be installed here (no GPU); the proxy's tests run it against a stand-in `vllm`
executable (fake_vllm.py) that decodes the embeddings exactly as vLLM's chat server does. What
crosses the sidecar is real.
"""

from __future__ import annotations

import asyncio
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
from cornserve.vllm.command import VLLMServeArgs, vllm_serve_command
from cornserve.vllm.proxy import ProxyConfig, ProxyState

HERE = Path(__file__).parent


def fake_vllm(tmp_path: Path) -> Path:
    """The stand-in as an executable named like vLLM's (it plays FAKE_VLLM_VERSION, default 0.33.0)."""
    fake = tmp_path / "vllm"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_vllm.py"} "$@"\n')
    fake.chmod(0o755)
    return fake


async def send_embedding(
    sender: Sidecar, forward_id: str, rank: int, tensor: torch.Tensor, grid: list[int]
) -> None:
    """One embedding forward the way Eric sends it: the tensor, then its metadata naming its dtype."""
    await sender.send(
        tensor, forward_id, [[rank]], chunk_id=EMBEDDING_TENSOR_CHUNK, num_chunks=EMBEDDING_NUM_CHUNKS
    )
    meta = EmbeddingMeta(
        modality="image",
        num_tokens=tensor.shape[0],
        grid_thw=grid,
        model_id="tiny-qwen",
        dtype=str(tensor.dtype).removeprefix("torch."),  # type: ignore[arg-type]
    )
    await sender.send(
        meta.model_dump(mode="json"),
        forward_id,
        [[rank]],
        chunk_id=EMBEDDING_META_CHUNK,
        num_chunks=EMBEDDING_NUM_CHUNKS,
    )


def chat_body(ids: list[str], rank: int) -> dict[str, object]:
    content: list[dict[str, object]] = [
        {"type": "image_url", "image_url": {"url": f"file:///{i}.png"}} for i in ids
    ]
    return {
        "model": "tiny-qwen",
        "stream": True,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": "what is it"}]}],
        "cornserve_embeddings": [{"id": i, "dst_sidecar_ranks": [[rank]]} for i in ids],
    }


@pytest.mark.slow
async def test_proxy_feeds_sidecar_embeddings_to_vllm(
    sidecars: StartSidecars,
    nats_url: str,
    tmp_path: Path,
) -> None:
    src, dst = await sidecars(2)
    fake = fake_vllm(tmp_path)
    port = free_port()
    proxy = ServiceProcess.start(
        "proxy",
        python_module(
            "cornserve.vllm", "--model-id", "tiny-qwen", "--port", str(port),
            "--sidecar-ranks", str(dst.rank), "--vllm-executable", str(fake), "--embedding-timeout", "5",
            "--", "--enforce-eager", "--dtype", "float16",
        ),
        tmp_path,
        {"CORNSERVE_NATS_URL": nats_url},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_healthy, url, process=proxy, timeout=90)
        # Two items of one batch buffer in bfloat16 (the checkpoint's dtype), as Eric sends them.
        batch = torch.arange(40 * 8, dtype=torch.float32).reshape(40, 8).to(torch.bfloat16)
        async with Sidecar(src.rank, nats_url) as sender:
            await send_embedding(sender, "fwd-1", dst.rank, batch[:3], [1, 2, 6])
            await send_embedding(sender, "fwd-2", dst.rank, batch[3:5], [1, 2, 4])
        body = chat_body(["fwd-1", "fwd-2"], dst.rank)
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/health") as response:
                assert (await response.json())["vllm_version"] == "0.33.0"
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200, await response.text()
                lines = [line.decode().strip() async for line in response.content if line.strip()]
            assert lines[-1] == "data: [DONE]"
            chunk = json.loads(lines[0][len("data:") :])
            report = json.loads(chunk["choices"][0]["delta"]["content"])
            # Cast to vLLM's --dtype (float16), each item alone in its storage, one part per item.
            assert report["embeds"] == [
                {"modality": "image", "shape": [3, 8], "sum": float(batch[:3].half().float().sum()), "dtype": "float16",
                 "storage_bytes": 3 * 8 * 2, "nbytes": 3 * 8 * 2, "grid_thw": [1, 2, 6]},
                {"modality": "image", "shape": [2, 8], "sum": float(batch[3:5].half().float().sum()), "dtype": "float16",
                 "storage_bytes": 2 * 8 * 2, "nbytes": 2 * 8 * 2, "grid_thw": [1, 2, 4]},
            ]  # fmt: skip
            flags = report["flags"]
            assert "--enable-mm-embeds" in flags and "--enforce-eager" in flags
            # 0.33 takes embeddings with zero media limits: the vision tower is not loaded.
            assert json.loads(flags[flags.index("--limit-mm-per-prompt") + 1]) == {"image": 0, "video": 0}

            # An embedding that never arrives: a prompt 504 naming the problem; the proxy stays up.
            body["cornserve_embeddings"] = [{"id": "never-sent"}, {"id": "never-sent-2"}]
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 504
                assert "did not arrive" in (await response.json())["error"]["message"]
            # Plain and grid-carrying embeddings in one request: refused here with the reason,
            # before vLLM would raise NotImplementedError.
            async with Sidecar(src.rank, nats_url) as sender:
                await send_embedding(sender, "fwd-3", dst.rank, batch[5:7], [1, 2, 4])
                await sender.send(
                    batch[7:9],
                    "fwd-4",
                    [[dst.rank]],
                    chunk_id=EMBEDDING_TENSOR_CHUNK,
                    num_chunks=EMBEDDING_NUM_CHUNKS,
                )
                plain = EmbeddingMeta(modality="image", num_tokens=2, model_id="tiny-llava", dtype="bfloat16")
                await sender.send(
                    plain.model_dump(mode="json"),
                    "fwd-4",
                    [[dst.rank]],
                    chunk_id=EMBEDDING_META_CHUNK,
                    num_chunks=EMBEDDING_NUM_CHUNKS,
                )
            async with session.post(
                url + "/v1/chat/completions", json=chat_body(["fwd-3", "fwd-4"], dst.rank)
            ) as response:
                assert response.status == 400
                assert "mixes plain and grid-carrying" in (await response.json())["error"]["message"]
            async with session.post(url + "/v1/chat/completions", data=b"{not json") as response:
                assert response.status == 400
            async with session.get(url + "/health") as response:
                assert response.status == 200
    finally:
        code = proxy.stop(timeout=40)
    assert code == 0, proxy.log()
    stray = subprocess.run(["pgrep", "-f", str(HERE / "fake_vllm.py")], capture_output=True, text=True)
    assert stray.stdout.strip() == "", "the proxy left vLLM running"


@pytest.mark.parametrize(("version", "skips"), [("0.15.1", False), ("0.16.0", True), ("garbage", False)])
async def test_vision_tower_skipped_where_the_installed_vllm_allows(
    version: str, skips: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM before 0.16 refuses embeddings with zero media limits: it keeps its tower there."""
    if version == "garbage":
        script = tmp_path / "vllm"
        script.write_text("#!/bin/sh\necho not a version\n")
        script.chmod(0o755)
        executable = script
    else:
        monkeypatch.setenv("FAKE_VLLM_VERSION", version)
        executable = fake_vllm(tmp_path)
    config = ProxyConfig(
        serve=VLLMServeArgs(model="m", port=9000), sidecar_rank=0, vllm_executable=str(executable)
    )
    state = ProxyState(config, free_port(), on_failure=lambda: None)
    await state._detect()
    command = vllm_serve_command(state.internal_args)
    assert ("--limit-mm-per-prompt" in command) is skips
    assert "--enable-mm-embeds" in command


@pytest.mark.slow  # waits out real probe and start deadlines
async def test_proxy_probe_timeout_and_start_deadline(
    sidecars: StartSidecars, nats_url: str, tmp_path: Path
) -> None:
    """A vLLM that accepts /health and never answers: each probe gives up, the start deadline ends it (exit 1)."""
    (dst,) = await sidecars(1)
    # Listens at once (no torch to import, unlike fake_vllm.py), accepts, never answers.
    hang = tmp_path / "vllm"
    hang.write_text(HANG_VLLM.format(python=sys.executable))
    hang.chmod(0o755)
    proxy = ServiceProcess.start(
        "proxy-hang",
        python_module(
            "cornserve.vllm", "--model-id", "tiny-qwen", "--port", str(free_port()),
            "--sidecar-ranks", str(dst.rank), "--vllm-executable", str(hang),
            "--ready-timeout", "6", "--probe-timeout", "0.5", "--progress-interval", "2",
        ),
        tmp_path,
        {"CORNSERVE_NATS_URL": nats_url},
    )  # fmt: skip
    code = await asyncio.to_thread(proxy.wait_exit, 90)
    log = proxy.log()
    assert code == 1, log
    assert "vLLM did not become healthy within 6s (last probe: /health did not answer within 0.5s)" in log
    assert "waiting for vLLM:" in log
    stray = subprocess.run(["pgrep", "-f", str(hang)], capture_output=True, text=True)
    assert stray.stdout.strip() == "", "the proxy left vLLM running"


HANG_VLLM = """#!{python}
import socket, sys, time
if sys.argv[1:] == ["--version"]:
    print("0.33.0")
    raise SystemExit(0)
port = int(sys.argv[sys.argv.index("--port") + 1])
server = socket.create_server(("127.0.0.1", port))
held = []
while True:
    held.append(server.accept()[0])
"""


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
