"""The official `openai` client against the example app through `/v1/chat/completions` on a live cluster.

One cluster for the module: the example app (`examples/mllm_app.py`, encoder fission on a tiny
Qwen2-VL) is registered as `demo`, and copies of it — an alias, a unary variant, a plain
(non-OpenAI) variant and one with room for a single invocation — share its two unit tasks, so
nothing more is deployed. Every request goes through the `openai` package (sync and async, streamed
and not): no hand-made HTTP. The bar: the streamed text equals the app's native invoke on the same
request (and transformers' own greedy `generate`), the usage counts are the prompt's and the
answer's token counts, and each error arrives as the client's exception type with OpenAI's fields.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from tests.e2e.media import MAX_TOKENS, data_url, messages, picture, reference_text
from tests.support.cluster import running_local_cluster
from tests.support.plugin import TinyCheckpoint

from cornserve.bus.control import ProgressEvent
from cornserve.cli.launcher import LocalCluster
from cornserve.client import CornserveClient, CornserveError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mllm_app.py"
PROMPT = "What is in this picture?"

UNARY_SERVE = """

from cornserve.task.builtins import ChatCompletion


async def serve(request: ChatCompletionRequest) -> ChatCompletion:
    return ChatCompletion.from_chunks([chunk async for chunk in await mllm(request)])
"""

PLAIN_SERVE = """

from pydantic import BaseModel


class Answer(BaseModel):
    text: str


async def serve(request: ChatCompletionRequest) -> AsyncIterator[Answer]:
    async for chunk in await mllm(request):
        for choice in chunk.choices:
            if choice.delta.content:
                yield Answer(text=choice.delta.content)
"""


def _variants(source: str) -> dict[str, str]:
    """The apps the module registers: the example, and copies of it sharing its tasks."""
    head = source.split("\nasync def serve", 1)[0]
    assert "    openai_chat = True\n" in head
    return {
        "demo": source,
        "demo-alias": source.replace("    openai_chat = True\n", "    openai_chat = True\n    openai_aliases = ('tiny-qwen',)\n"),
        "demo-unary": head + UNARY_SERVE,
        "demo-plain": head.replace("    openai_chat = True\n", "") + PLAIN_SERVE,
        "demo-narrow": source.replace("    openai_chat = True\n", "    openai_chat = True\n    max_concurrency = 1\n    max_queue = 0\n"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint: TinyCheckpoint) -> Path:
    return tiny_checkpoint("qwen2-vl", seed=0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, qwen: Path) -> Iterator[LocalCluster]:
    """One cluster with every app registered; the example app reads its model from the environment."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CORNSERVE_DEMO_MODEL", str(qwen))
        with running_local_cluster(tmp_path_factory.mktemp("openai-cluster"), cpu_slots=2) as local:
            asyncio.run(_register_all(local))
            yield local


async def _register_all(local: LocalCluster) -> None:
    async with CornserveClient(local.url, token=local.admin_token, timeout_s=600) as client:
        for name, source in _variants(EXAMPLE.read_text()).items():
            events = [event async for event in client.register_app(name, source)]
            app = events[-1]
            assert not isinstance(app, ProgressEvent) and app.state == "ready", events


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[openai.OpenAI]:
    """The sync client with the cluster's admin token (the `api_key` it sends as a bearer token)."""
    with _client(cluster) as opened:
        yield opened


@pytest.fixture
def stranger(cluster: LocalCluster) -> Iterator[openai.OpenAI]:
    """A sync client whose key this gateway does not know."""
    with _client(cluster, api_key="not-a-token-of-this-gateway") as opened:
        yield opened


def _client(local: LocalCluster, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=local.url + "/v1", api_key=api_key or local.admin_token, max_retries=0, timeout=300
    )


def _async_client(local: LocalCluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=local.url + "/v1", api_key=local.admin_token, max_retries=0, timeout=300
    )


async def _native(local: LocalCluster, app: str, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The app's own invoke route: (the streamed text, the usage its last chunk carried)."""
    text, usage = [], None
    async with CornserveClient(local.url, token=local.admin_token) as client:
        async for chunk in client.invoke_app(app, body):
            text.extend(c["delta"].get("content") or "" for c in chunk["choices"])
            usage = chunk.get("usage") or usage
    return "".join(text), usage


async def _native_error(local: LocalCluster, body: dict[str, Any]) -> CornserveError:
    """The error the app's own invoke route answers `body` with."""
    async with CornserveClient(local.url, token=local.admin_token) as client:
        with pytest.raises(CornserveError) as refused:
            async for _ in client.invoke_app("demo", body):
                pass
    return refused.value


def _counts(usage: Any) -> tuple[int, int, int]:
    """(prompt, completion, total) tokens of the client's usage object or the native chunk's usage JSON."""
    fields = usage if isinstance(usage, dict) else usage.model_dump()
    return fields["prompt_tokens"], fields["completion_tokens"], fields["total_tokens"]


def _prompt_tokens(model_dir: Path, image: Any, prompt: str) -> int:
    """How many tokens the prompt is: the chat template with the image's placeholder tokens expanded."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return int(processor(text=[text], images=[image], return_tensors="pt")["input_ids"].shape[1])


def test_the_sync_client_streams_what_the_native_invoke_streams_with_the_right_usage(
    cluster: LocalCluster, client: openai.OpenAI, qwen: Path
) -> None:
    image = picture(1)
    msgs = messages(data_url(image), PROMPT)
    native_text, native_usage = asyncio.run(
        _native(cluster, "demo", {"messages": msgs, "max_completion_tokens": MAX_TOKENS})
    )
    assert native_text == reference_text(qwen, image, PROMPT)
    stream = client.chat.completions.create(
        model="demo", messages=msgs, max_completion_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.model == "demo" and chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == native_text
    assert usage is not None and native_usage is not None
    assert _counts(usage) == _counts(native_usage)
    assert usage.prompt_tokens == _prompt_tokens(qwen, image, PROMPT)
    assert finish in ("length", "stop")
    if finish == "length":
        assert usage.completion_tokens == MAX_TOKENS
    else:
        assert 1 <= usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    completion = client.chat.completions.create(model="demo", messages=msgs, max_completion_tokens=MAX_TOKENS)
    assert completion.object == "chat.completion" and completion.model == "demo"
    assert completion.choices[0].message.content == native_text
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].finish_reason == finish
    assert completion.usage is not None and _counts(completion.usage) == _counts(usage)

    without_usage = client.chat.completions.create(
        model="demo", messages=msgs, max_completion_tokens=MAX_TOKENS, stream=True
    )
    chunks = list(without_usage)
    assert all(c.usage is None and c.choices for c in chunks)  # usage only when asked for, as OpenAI does
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == native_text


async def test_the_async_client_streams_and_completes_through_an_alias_and_a_unary_app(
    cluster: LocalCluster,
) -> None:
    msgs = messages(data_url(picture(2)), "Describe the shapes.")
    native_text, native_usage = await _native(
        cluster, "demo", {"messages": msgs, "max_completion_tokens": MAX_TOKENS}
    )
    async with _async_client(cluster) as client:
        for model in ("demo-alias", "tiny-qwen", "demo-unary"):
            stream = await client.chat.completions.create(
                model=model, messages=msgs, max_completion_tokens=MAX_TOKENS, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            pieces, usage = [], None
            async for chunk in stream:
                assert chunk.model == model
                pieces.extend(choice.delta.content or "" for choice in chunk.choices)
                usage = chunk.usage or usage
            assert "".join(pieces) == native_text, model
            assert usage is not None and native_usage is not None
            assert _counts(usage) == _counts(native_usage), model
            completion = await client.chat.completions.create(
                model=model, messages=msgs, max_completion_tokens=MAX_TOKENS
            )
            assert completion.choices[0].message.content == native_text, model
            assert completion.usage is not None and _counts(completion.usage) == _counts(native_usage), model


def test_models_lists_the_apps_that_speak_openai_under_every_name(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert models.object == "list"
    ids = sorted(m.id for m in models.data)
    assert ids == ["demo", "demo-alias", "demo-narrow", "demo-unary", "tiny-qwen"]  # not demo-plain
    assert all(m.object == "model" and m.owned_by == "cornserve" and m.created > 0 for m in models.data)


def test_errors_arrive_as_the_clients_exception_types_in_openais_shape(
    client: openai.OpenAI, stranger: openai.OpenAI
) -> None:
    msgs = messages(data_url(picture(3)), "hi")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-app", messages=msgs)
    assert unknown.value.code == "model_not_found" and unknown.value.type == "invalid_request_error"
    assert unknown.value.param == "model" and "no-such-app" in unknown.value.message
    with pytest.raises(openai.NotFoundError) as plain:  # registered, but it does not speak OpenAI
        client.chat.completions.create(model="demo-plain", messages=msgs)
    assert plain.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="demo", messages=[])
    assert empty.value.type == "invalid_request_error" and empty.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as media:
        client.chat.completions.create(
            model="demo", messages=messages("file:///etc/passwd", "hi"), max_completion_tokens=4
        )
    assert (
        "file: URLs are off on this executor" in media.value.message and media.value.code == "invalid_input"
    )
    with pytest.raises(openai.BadRequestError) as internal:  # forward ids are for tasks, not callers
        client.chat.completions.create(model="demo", messages=msgs, extra_body={"cornserve_embeddings": []})
    assert internal.value.param == "cornserve_embeddings"
    with pytest.raises(openai.AuthenticationError) as refused:
        stranger.chat.completions.create(model="demo", messages=msgs)
    assert refused.value.status_code == 401 and refused.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_an_app_at_capacity_answers_429_with_retry_after(client: openai.OpenAI) -> None:
    msgs = messages(data_url(picture(4)), "Tell me a very long story.")
    holding = client.chat.completions.create(
        model="demo-narrow", messages=msgs, max_completion_tokens=4000, stream=True
    )  # the only slot stays taken until this stream ends
    try:
        assert next(iter(holding)).choices
        with pytest.raises(openai.RateLimitError) as full:
            client.chat.completions.create(model="demo-narrow", messages=msgs, max_completion_tokens=4)
        assert full.value.status_code == 429 and full.value.code == "overloaded"
        assert int(full.value.response.headers["Retry-After"]) >= 1
    finally:
        holding.close()  # hanging up cancels the generation and frees the slot


def test_the_cli_invokes_the_example_request_and_prints_json_chunks_or_their_text(
    cluster: LocalCluster,
) -> None:
    request = Path(__file__).resolve().parents[2] / "examples" / "mllm_request.json"
    native_text, native_usage = asyncio.run(_native(cluster, "demo", json.loads(request.read_text())))
    assert native_usage is not None

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cornserve.cli.main", "invoke", *args, "demo", f"@{request}"],
            env={**os.environ, "CORNSERVE_URL": cluster.url, "CORNSERVE_STATE_DIR": str(cluster.state_dir)},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    internal = asyncio.run(
        _native_error(cluster, {**json.loads(request.read_text()), "cornserve_embeddings": []})
    )
    assert (
        internal.status == 400 and "cornserve_embeddings" in internal.message
    )  # the native route refuses it too
    plain = cli()
    assert plain.returncode == 0, plain.stderr
    chunks = [json.loads(line) for line in plain.stdout.splitlines()]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = cli("--text")
    assert text.returncode == 0, text.stderr
    assert text.stdout == native_text + "\n"
    prompt, completion = native_usage["prompt_tokens"], native_usage["completion_tokens"]
    assert f"usage: prompt {prompt} + completion {completion} tokens" in text.stderr


pytestmark = pytest.mark.timeout(900)
