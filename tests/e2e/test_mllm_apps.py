"""MLLM apps end to end: gateway → dispatcher → Eric → sidecar → LLM executor → streamed tokens.

The bar: for the same image + text, an app with encoder fission and one without both stream
exactly the text that transformers' own greedy `generate` produces in-process on the same
checkpoint — for the Qwen2-VL family and for LLaVA.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from tests.e2e.apps import MLLM_APP, SHARED_ENCODER_APP

from cornserve.runtime.process import free_port

MAX_TOKENS = 12


def picture(seed: int, size: int = 80) -> Any:
    """A synthetic RGB picture."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    colours = [tuple(int(c) for c in torch.randint(0, 256, (3,), generator=gen)) for _ in range(3)]
    image = Image.new("RGB", (size, size), colours[0])
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 4, size // 4, size // 2, size // 2), fill=colours[1])
    draw.ellipse((size // 2, size // 3, size - 4, size - 4), fill=colours[2])
    return image


def data_url(image: Any) -> str:
    """The picture as a PNG `data:` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def messages(url: str, prompt: str) -> list[dict[str, Any]]:
    """One user turn: an image, then the question."""
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
        }
    ]


def reference_text(model_dir: Path, image: Any, prompt: str) -> str:
    """What transformers' greedy `generate` says in-process on the monolithic model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return str(processor.tokenizer.decode(new, skip_special_tokens=True))


async def register(gateway: aiohttp.ClientSession, name: str, source: str) -> dict[str, Any]:
    async with gateway.post("/apps", json={"name": name, "source": source}) as response:
        body = await response.json()
        assert response.status == 201, body
        return dict(body)


async def unregister(gateway: aiohttp.ClientSession, name: str) -> None:
    async with gateway.delete(f"/apps/{name}") as response:
        assert response.status == 200, await response.text()


async def ask(gateway: aiohttp.ClientSession, app: str, body: dict[str, Any]) -> tuple[int, str, list[str]]:
    """Invoke a streaming app: (status, error message or "", the streamed text pieces)."""
    async with gateway.post(f"/apps/{app}/invoke", json=body) as response:
        if response.status != 200:
            error = await response.json()
            return response.status, str(error.get("message", error)), []
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        pieces = []
        async for line in response.content:
            if line.strip():
                item = json.loads(line)
                assert "error" not in item, item
                pieces.append(item["text"])
        return 200, "", pieces


async def task_keys(gateway: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    async with gateway.get("/tasks") as response:
        assert response.status == 200
        return {t["key"]: t for t in (await response.json())["tasks"]}


async def test_qwen2_vl_fission_and_monolithic_match_transformers_and_share_the_encoder(
    gateway: aiohttp.ClientSession, checkpoints: dict[str, Path], media_dir: Path
) -> None:
    qwen, qwen_b = checkpoints["qwen"], checkpoints["qwen-b"]
    fission = await register(gateway, "qwen-fission", MLLM_APP.format(model=str(qwen), fission=True))
    mono = await register(gateway, "qwen-mono", MLLM_APP.format(model=str(qwen), fission=False))
    other = await register(
        gateway,
        "qwen-b-shared",
        SHARED_ENCODER_APP.format(encoder_model=str(qwen), llm_model=str(qwen_b)),
    )
    encoder_keys = [t["key"] for t in fission["tasks"] if "encoder" in t["key"].lower()]
    assert len(encoder_keys) == 1, fission["tasks"]
    assert encoder_keys[0] in {t["key"] for t in other["tasks"]}
    tasks = await task_keys(gateway)
    assert len(tasks) == 4, sorted(tasks)  # one encoder, three LLMs: the encoder is deployed once
    assert mono["tasks"]

    image = picture(1)
    file_image = media_dir / "picture.png"
    picture(2).save(file_image)
    for url, img, prompt in (
        (data_url(image), image, "What is in this picture?"),
        (f"file://{file_image}", picture(2), "Describe the shapes."),
    ):
        body = {"messages": messages(url, prompt), "max_completion_tokens": MAX_TOKENS}
        expected = reference_text(qwen, img, prompt)
        for app in ("qwen-fission", "qwen-mono"):
            status, error, pieces = await ask(gateway, app, body)
            assert status == 200, error
            assert "".join(pieces) == expected, (app, pieces, expected)
        status, error, pieces = await ask(gateway, "qwen-b-shared", body)
        assert status == 200, error
        assert pieces, "the second LLM streamed nothing"

    # Bad inputs: a clear 4xx, and the executors stay up.
    bad_cases = [
        (
            messages("file:///nonexistent/cornserve.png", "hi"),
            MAX_TOKENS,
            "not in an allowed media directory",
        ),
        (messages("file:///etc/passwd", "hi"), MAX_TOKENS, "not in an allowed media directory"),
        (
            messages(f"http://127.0.0.1:{free_port()}/cornserve.png", "hi"),
            MAX_TOKENS,
            "address is not allowed",
        ),
        (messages("data:image/png;base64,bm90IGFuIGltYWdl", "hi"), MAX_TOKENS, ""),
        (
            [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///v.mp4"}}]}],
            MAX_TOKENS,
            "video",
        ),
        (messages(data_url(image), "hi"), 1_000_000, ""),
    ]
    for app in ("qwen-fission", "qwen-mono"):
        for msgs, max_tokens, needle in bad_cases:
            status, error, _ = await ask(
                gateway, app, {"messages": msgs, "max_completion_tokens": max_tokens}
            )
            assert 400 <= status < 500, (app, status, error)
            assert needle in error, (app, error)
    status, error, pieces = await ask(
        gateway,
        "qwen-fission",
        {"messages": messages(data_url(image), "still there?"), "max_completion_tokens": 4},
    )
    assert status == 200 and pieces, error

    await unregister(gateway, "qwen-fission")
    assert encoder_keys[0] in await task_keys(gateway), "the encoder is still used by another app"
    await unregister(gateway, "qwen-b-shared")
    await unregister(gateway, "qwen-mono")
    assert await task_keys(gateway) == {}


async def test_llava_fission_and_monolithic_match_transformers(
    gateway: aiohttp.ClientSession, checkpoints: dict[str, Path]
) -> None:
    llava = checkpoints["llava"]
    await register(gateway, "llava-fission", MLLM_APP.format(model=str(llava), fission=True))
    await register(gateway, "llava-mono", MLLM_APP.format(model=str(llava), fission=False))
    image = picture(3)
    prompt = "What do you see?"
    expected = reference_text(llava, image, prompt)
    body = {"messages": messages(data_url(image), prompt), "max_completion_tokens": MAX_TOKENS}
    for app in ("llava-fission", "llava-mono"):
        status, error, pieces = await ask(gateway, app, body)
        assert status == 200, error
        assert "".join(pieces) == expected, (app, pieces, expected)
    await unregister(gateway, "llava-fission")
    await unregister(gateway, "llava-mono")
    assert await task_keys(gateway) == {}


pytestmark = pytest.mark.timeout(900)
