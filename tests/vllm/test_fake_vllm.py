"""The stand-in `vllm` refuses what the vLLM release it plays refuses (so the proxy tests can fail).

Each case is a request vLLM's chat server answers with an error in the release named; the stand-in
must answer it the same way, or a proxy that sent it would pass its tests against the stand-in
and fail against vLLM.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import torch
from tests.support.processes import ServiceProcess
from tests.support.waiting import wait_healthy

from cornserve.runtime.process import free_port

HERE = Path(__file__).parent


def b64(tensor: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


PLAIN = {"type": "image_embeds", "image_embeds": b64(torch.ones(4, 8))}
GRID = {
    "type": "image_embeds",
    "image_embeds": {"image_embeds": b64(torch.ones(4, 8)), "image_grid_thw": b64(torch.tensor([1, 4, 4]))},
}
RAW = {"type": "image_url", "image_url": {"url": "file:///a.png"}}


def body(*parts: dict[str, object]) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


async def start_fake(tmp_path: Path, version: str, *flags: str) -> tuple[ServiceProcess, str]:
    port = free_port()
    cmd = [sys.executable, str(HERE / "fake_vllm.py"), "serve", "m", "--port", str(port), *flags]
    proc = ServiceProcess.start(f"fake-{version}-{len(flags)}", cmd, tmp_path, {"FAKE_VLLM_VERSION": version})
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_healthy, url, process=proc, timeout=60)
    return proc, url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(session: aiohttp.ClientSession, url: str, payload: dict[str, object]) -> tuple[int, str]:
    async with session.post(url + "/v1/chat/completions", json=payload) as response:
        return response.status, await response.text()


@pytest.mark.slow  # two stand-in vLLM processes each
async def test_stand_in_refuses_like_vllm_0_33(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    limits = json.dumps({"image": 0, "video": 0})
    proc, url = await start_fake(tmp_path, "0.33.0", "--enable-mm-embeds", "--limit-mm-per-prompt", limits)
    try:
        assert (await post(session, url, body(PLAIN, PLAIN)))[
            0
        ] == 200  # zero limit, embeddings pass (>= 0.16)
        assert (await post(session, url, body(GRID, GRID)))[0] == 200
        status, text = await post(session, url, body(GRID, PLAIN))
        assert status == 501 and json.loads(text)["error"]["type"] == "NotImplementedError"
        status, text = await post(session, url, body(RAW))
        assert status == 400 and "At most 0 image(s)" in text
    finally:
        proc.stop()
    proc, url = await start_fake(tmp_path, "0.33.0")
    try:
        status, text = await post(session, url, body(PLAIN))
        assert status == 400 and "You must set `--enable-mm-embeds` to input `image_embeds`" in text
        assert (await post(session, url, body(RAW, RAW)))[0] == 200
    finally:
        proc.stop()


@pytest.mark.slow
async def test_stand_in_refuses_like_vllm_0_15(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    limits = json.dumps({"image": 0, "video": 0})
    proc, url = await start_fake(tmp_path, "0.15.1", "--enable-mm-embeds", "--limit-mm-per-prompt", limits)
    try:
        status, text = await post(session, url, body(PLAIN))
        assert status == 400 and "At most 0 image(s)" in text  # before 0.16 the limit holds for embeddings
    finally:
        proc.stop()
    proc, url = await start_fake(tmp_path, "0.15.1", "--enable-mm-embeds")
    try:
        status, text = await post(session, url, body(RAW, PLAIN))
        assert status == 400 and "Mixing raw image and embedding inputs is not allowed" in text
        status, _ = await post(
            session, url, body({"type": "video_embeds", "video_embeds": PLAIN["image_embeds"]})
        )
        assert status == 400  # no video_embeds part before 0.29
        assert (await post(session, url, body(PLAIN, PLAIN)))[0] == 200
    finally:
        proc.stop()
    assert os.environ.get("FAKE_VLLM_VERSION") is None  # the version travels in the child's environment only
