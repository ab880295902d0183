"""MLLM apps end to end: gateway → dispatcher → Eric → sidecar → LLM executor → streamed tokens.

The bar: for the same image + text, an app with encoder fission and one without both stream
exactly the text that transformers' own greedy `generate` produces in-process on the same
checkpoint — for the Qwen2-VL family and for LLaVA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.e2e.apps import MLLM_APP, SHARED_ENCODER_APP
from tests.e2e.media import MAX_TOKENS, data_url, messages, picture, reference_text

from cornserve.runtime.process import free_port


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
    shared_texts: list[str] = []
    qwen_texts: list[str] = []
    for url, img, prompt in (
        (data_url(image), image, "What is in this picture?"),
        (f"file://{file_image}", picture(2), "Describe the shapes."),
    ):
        body = {"messages": messages(url, prompt), "max_completion_tokens": MAX_TOKENS}
        expected = reference_text(qwen, img, prompt)
        qwen_texts.append(expected)
        for app in ("qwen-fission", "qwen-mono"):
            status, error, pieces = await ask(gateway, app, body)
            assert status == 200, error
            assert "".join(pieces) == expected, (app, pieces, expected)
        status, error, pieces = await ask(gateway, "qwen-b-shared", body)
        assert status == 200, error
        assert pieces, "the second LLM streamed nothing"
        shared_texts.append("".join(pieces))
    # The LLM executors published those streams on the gateway's subjects themselves (no relay).
    for key, task in (await task_keys(gateway)).items():
        if "encoder" not in key.lower():
            url = task["executors"][0]["url"]
            async with aiohttp.ClientSession() as session, session.get(f"{url}/stats") as response:
                assert (await response.json())["published_streams"] >= 2, key

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

    # The first case: picture(1), "What is in this picture?" (the arena asks the same).
    await check_arena_and_chain(gateway, qwen, qwen_b, encoder_keys[0], qwen_texts[0], shared_texts[0])

    await unregister(gateway, "qwen-fission")
    assert encoder_keys[0] in await task_keys(gateway), "the encoder is still used by another app"
    await unregister(gateway, "qwen-b-shared")
    assert await task_keys(gateway) == {}


async def check_arena_and_chain(
    gateway: aiohttp.ClientSession,
    qwen: Path,
    qwen_b: Path,
    encoder_key: str,
    qwen_text: str,
    qwen_b_text: str,
) -> None:
    """examples/arena_app.py and examples/chain_app.py on the tiny checkpoints (issue 16).

    The arena's LLMs (non-streamed completions) share the deployments of the fission LLMs already
    running, so it deploys nothing: its encoder runs once per request for both LLMs (its stats
    count one item), and each answer is the one the same model streams. The chain's description
    is the transformers reference; its rewriter is the one new deployment (in qwen-mono's slot).
    """
    before = set(await task_keys(gateway))
    arena = await register(gateway, "arena", arena_source(qwen, [qwen, qwen_b]))
    assert {t["key"] for t in arena["tasks"]} <= before, "the arena shares every deployment"
    image, prompt = picture(1), "What is in this picture?"
    encoder_url = (await task_keys(gateway))[encoder_key]["executors"][0]["url"]
    encoded_before = await encoded_items(encoder_url)
    body = {"image_url": data_url(image), "prompt": prompt, "max_completion_tokens": MAX_TOKENS}
    async with gateway.post("/apps/arena/invoke", json=body) as response:
        answer = await response.json()
        assert response.status == 200, answer
    assert [a["model"] for a in answer["answers"]] == [str(qwen), str(qwen_b)]
    assert [a["text"] for a in answer["answers"]] == [qwen_text, qwen_b_text]
    assert await encoded_items(encoder_url) == encoded_before + 1  # once for both LLMs
    await unregister(gateway, "arena")

    await unregister(gateway, "qwen-mono")  # frees a CPU slot for the chain's rewriter
    await register(gateway, "chain", chain_source(qwen, qwen_b))
    body = {"image_url": data_url(image), "style": "one line", "max_completion_tokens": MAX_TOKENS}
    async with gateway.post("/apps/chain/invoke", json=body) as response:
        assert response.status == 200, await response.text()
        pieces = [json.loads(line) async for line in response.content if line.strip()]
    assert pieces[0] == {
        "stage": "description",
        "text": reference_text(qwen, image, "Describe this picture."),
    }
    assert pieces[1:] and all(p["stage"] == "rewrite" for p in pieces[1:]), pieces
    await unregister(gateway, "chain")


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def arena_source(encoder: Path, llms: list[Path]) -> str:
    """examples/arena_app.py with its models set to tiny checkpoints."""
    source = (EXAMPLES / "arena_app.py").read_text()
    encoder_default = 'os.environ.get("CORNSERVE_ARENA_ENCODER", "Qwen/Qwen2-VL-2B-Instruct")'
    models_default = source[source.index('os.environ.get(\n    "CORNSERVE_ARENA_MODELS"') :]
    models_default = models_default[: models_default.index('.split(",")') + len('.split(",")')]
    assert encoder_default in source
    return source.replace(encoder_default, repr(str(encoder))).replace(
        models_default, repr([str(m) for m in llms])
    )


def chain_source(describer: Path, rewriter: Path) -> str:
    """examples/chain_app.py with its models set to tiny checkpoints."""
    source = (EXAMPLES / "chain_app.py").read_text()
    replacements = {
        'os.environ.get("CORNSERVE_CHAIN_DESCRIBER", "Qwen/Qwen2-VL-2B-Instruct")': repr(str(describer)),
        'os.environ.get("CORNSERVE_CHAIN_REWRITER", "Qwen/Qwen2.5-0.5B-Instruct")': repr(str(rewriter)),
    }
    for old, new in replacements.items():
        assert old in source, old
        source = source.replace(old, new)
    return source


async def encoded_items(encoder_url: str) -> int:
    """Media items the encoder executor has encoded so far (its `GET /info` batching stats)."""
    async with aiohttp.ClientSession() as session, session.get(f"{encoder_url}/info") as response:
        assert response.status == 200
        return int((await response.json())["batching"]["items"])


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


pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
"""A cluster of its own with two MLLM families: minutes, so behind `slow` (`.ci/run` runs it)."""
