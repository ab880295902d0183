"""The CPU LLM executor against real processes: sidecars, NATS, HTTP, and transformers' own generate."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import aiohttp
import nats.errors
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from tests.llm_executor.support import (
    TEST_DEVICE,
    LLMExecutorSetup,
    get_json,
    image_messages,
    mp4_file,
    png_data_url,
    post_json,
)
from transformers import AutoModelForImageTextToText, AutoProcessor

from cornserve.bus.control import (
    STREAM_PUBLISHED_HEADER,
    STREAM_SUBJECT_HEADER,
    PublishedStreamEnd,
    StreamMessage,
)
from cornserve.llm_executor import publish
from cornserve.llm_executor.config import LLMExecutorSettings
from cornserve.llm_executor.detok import TextAssembler
from cornserve.llm_executor.engine import Sequence
from cornserve.llm_executor.errors import GenerationFailed
from cornserve.llm_executor.executor import LLMExecutor
from cornserve.llm_executor.prompt import INLINE_PROMPT_CHARS, PreparedPrompt, text_chars
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.llm_executor.server import ChatServer, Completion, Piece
from cornserve.models.media import MediaPolicy, load_media
from cornserve.models.media_errors import shorten_url
from cornserve.runtime.nats import connect_nats
from cornserve.runtime.process import free_port
from cornserve.runtime.settings import parse_settings
from cornserve.sidecar import Sidecar
from cornserve.task.builtins.chat import ChatCompletionChunk, ChatCompletionRequest
from cornserve.task.builtins.embedding import (
    EMBEDDING_META_CHUNK,
    EMBEDDING_NUM_CHUNKS,
    EMBEDDING_TENSOR_CHUNK,
    EmbeddingMeta,
)
from cornserve.task.builtins.llm import CPULLMDescriptor, LLMTask
from cornserve.task.builtins.modality import Modality
from cornserve.task.descriptor import ExecutorPlacement
from cornserve.task.errors import TaskExecutionError
from cornserve.task.forward import DataForward, Tensor
from cornserve.task.invocation import TaskInvocation

MAX_TOKENS = 12
DESCRIPTOR = CPULLMDescriptor()


class Reference:
    """The monolithic model in this process: the correctness oracle."""

    def __init__(self, model_dir: Path) -> None:
        self.model: Any = AutoModelForImageTextToText.from_pretrained(model_dir)
        self.model.eval()  # type: ignore[no-untyped-call]
        self.processor: Any = AutoProcessor.from_pretrained(model_dir)  # type: ignore[no-untyped-call]

    def inputs(self, items: list[tuple[str, Any]], text: str) -> Any:
        parts: list[dict[str, Any]] = [{"type": modality} for modality, _ in items]
        conversation = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images = [m for modality, m in items if modality == "image"]
        videos = [m for modality, m in items if modality == "video"]
        kwargs: dict[str, Any] = {"images": images} if images else {}
        if videos:
            kwargs["videos"] = videos
        return self.processor(text=[prompt], return_tensors="pt", **kwargs)

    def generate(
        self, items: list[tuple[str, Any]], text: str, max_new_tokens: int
    ) -> tuple[list[int], str, int]:
        inputs = self.inputs(items, text)
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        prompt_len = int(inputs["input_ids"].shape[1])
        ids = out[0, prompt_len:].tolist()
        return ids, self.processor.tokenizer.decode(ids, skip_special_tokens=True), prompt_len

    def embeddings(self, items: list[tuple[str, Any]], text: str) -> list[tuple[torch.Tensor, EmbeddingMeta]]:
        """What Eric sends per item: the rows the monolithic model scatters, plus chunk-1 metadata."""
        inputs = self.inputs(items, text)
        per_kind: dict[str, list[tuple[torch.Tensor, list[int] | None]]] = {"image": [], "video": []}
        with torch.no_grad():
            if "pixel_values_videos" in inputs:
                grids = inputs["video_grid_thw"]
                feats = self.model.get_video_features(inputs["pixel_values_videos"], grids).pooler_output
                per_kind["video"] = [
                    (f, [int(x) for x in g.tolist()]) for f, g in zip(feats, grids, strict=True)
                ]
            if "image_grid_thw" in inputs:
                grids = inputs["image_grid_thw"]
                feats = self.model.get_image_features(inputs["pixel_values"], grids).pooler_output
                per_kind["image"] = [
                    (f, [int(x) for x in g.tolist()]) for f, g in zip(feats, grids, strict=True)
                ]
            elif "pixel_values" in inputs:
                feats = self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
                per_kind["image"] = [(f, None) for f in feats]
        out = []
        for modality, _ in items:
            emb, grid = per_kind[modality].pop(0)
            emb = emb.to(torch.float32).contiguous()
            meta = EmbeddingMeta(
                modality=modality, num_tokens=int(emb.shape[0]), grid_thw=grid, model_id="tiny"
            )
            out.append((emb, meta))
        return out


async def send_embedding(
    producer: Sidecar, forward_id: str, dst: list[list[int]], tensor: torch.Tensor, meta: EmbeddingMeta
) -> None:
    """Send one embedding forward the way Eric does (docs/executors.md, "Embedding hand-off")."""
    await producer.send(
        tensor, forward_id, dst, chunk_id=EMBEDDING_TENSOR_CHUNK, num_chunks=EMBEDDING_NUM_CHUNKS
    )
    await producer.send(
        meta.model_dump(mode="json"),
        forward_id,
        dst,
        chunk_id=EMBEDDING_META_CHUNK,
        num_chunks=EMBEDDING_NUM_CHUNKS,
    )


def invocation(task: LLMTask, body: dict[str, Any]) -> TaskInvocation:
    req = ChatCompletionRequest.model_validate(body)
    return TaskInvocation(task=task, task_input=req, task_output=task.make_output_placeholder(req))


async def stream_via_descriptor(
    session: aiohttp.ClientSession, url: str, task: LLMTask, body: dict[str, Any]
) -> tuple[str, list[ChatCompletionChunk]]:
    """Send the request exactly as the dispatcher would and parse the stream with the descriptor."""
    inv = invocation(task, body)
    request = DESCRIPTOR.to_request(task, inv)
    assert request.stream
    chunks: list[ChatCompletionChunk] = []
    async with asyncio.timeout(120):
        async with session.post(url + request.path, json=request.body) as resp:
            assert resp.status == 200, await resp.text()
            async for raw in resp.content:
                chunk = DESCRIPTOR.from_stream_line(task, inv, raw.decode())
                if chunk is not None:
                    chunks.append(chunk)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def finish_of(chunks: list[ChatCompletionChunk]) -> str | None:
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) == 1, reasons
    return reasons[0]


# ---------------------------------------------------------------------- correctness


# The last case's text is longer than INLINE_PROMPT_CHARS: its fission prompt is prepared in a
# worker thread, the others' on the event loop.
@pytest.mark.parametrize(
    ("arch", "modalities", "text"),
    [
        ("qwen2-vl", ["image"], "Describe this picture."),
        ("llava", ["image"], "Describe this picture."),
        ("qwen2-vl", ["video"], "Describe this picture."),
        ("qwen2-vl", ["image", "video", "image"], "Describe this picture."),
        ("qwen2-vl", ["image"], "Describe this picture. " + "Be precise. " * (INLINE_PROMPT_CHARS // 12 + 1)),
    ],
)
async def test_greedy_matches_transformers_generate_in_both_modes(
    cluster: LLMExecutorSetup, nats_url: str, tmp_path: Path, arch: str, modalities: list[str], text: str
) -> None:
    ref = Reference(cluster.models[arch])
    parts: list[dict[str, Any]] = []
    items: list[tuple[str, Any]] = []
    for index, modality in enumerate(modalities):
        if modality == "image":
            url = png_data_url(seed=1 + index, size=(56 - 8 * index, 40))
        else:
            url = mp4_file(tmp_path / f"clip{index}.mp4").as_uri()
        parts.append({"type": f"{modality}_url", f"{modality}_url": {"url": url}})
        # The same decoder the executors use.
        items.append((modality, load_media(url, modality, MediaPolicy(media_dirs=str(tmp_path)))))
    ref_ids, ref_text, prompt_len = ref.generate(items, text, MAX_TOKENS)
    assert len(ref_ids) >= 1

    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    body = {"messages": messages, "max_completion_tokens": MAX_TOKENS, "temperature": 0.0}
    mono_task = LLMTask(model_id=str(cluster.models[arch]), modalities=[Modality(m) for m in set(modalities)])
    fission_task = LLMTask(model_id=str(cluster.models[arch]), receive_embeddings=True)

    embeddings = ref.embeddings(items, text)
    mono = cluster.monolithic[arch]
    fis = cluster.fission[arch]
    assert fis.sidecar_rank is not None
    dst = [[fis.sidecar_rank]]
    forwards = [
        DataForward[Tensor](src_sidecar_ranks=[cluster.producer_rank], dst_sidecar_ranks=dst) for _ in items
    ]
    fission_body = {**body, "cornserve_embeddings": [f.model_dump(mode="json") for f in forwards]}

    async with aiohttp.ClientSession() as session, Sidecar(cluster.producer_rank, nats_url) as producer:
        mono_text, mono_chunks = await stream_via_descriptor(session, mono.url, mono_task, body)
        # The LLM request goes first and waits for the embeddings, as with a real encoder task;
        # they are sent in reverse order to show the executor orders them by the request.
        fission_call = asyncio.create_task(
            stream_via_descriptor(session, fis.url, fission_task, fission_body)
        )
        for forward, (emb, meta) in reversed(list(zip(forwards, embeddings, strict=True))):
            # On a GPU run (CORNSERVE_TEST_LLM_DEVICE), the embeddings cross the sidecar as CUDA tensors.
            await send_embedding(producer, forward.id, dst, emb.to(TEST_DEVICE), meta)
        fission_text, fission_chunks = await fission_call

    for got_text, chunks in ((mono_text, mono_chunks), (fission_text, fission_chunks)):
        assert got_text == ref_text
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        assert usage.prompt_tokens == prompt_len
        assert usage.completion_tokens == len(ref_ids)
        assert usage.total_tokens == prompt_len + len(ref_ids)
        assert finish_of(chunks) == ("length" if len(ref_ids) == MAX_TOKENS else "stop")
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({c.id for c in chunks}) == 1


# ---------------------------------------------------------------------- batching and sampling


async def test_concurrent_streams_are_batched_and_each_matches_its_single_run(
    cluster: LLMExecutorSetup,
) -> None:
    mono = cluster.monolithic["qwen2-vl"]
    task = LLMTask(model_id="tiny", modalities=[Modality.IMAGE])
    bodies: list[dict[str, Any]] = [
        {"messages": image_messages(png_data_url(seed=10), "What is in the image?"), "max_completion_tokens": 24},
        {"messages": image_messages(png_data_url(seed=11, size=(32, 48)), "Colors?"), "max_completion_tokens": 24},
        {"messages": [{"role": "user", "content": "Tell me a story."}], "max_completion_tokens": 24},
        {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 24, "temperature": 0.9,
         "top_p": 0.8, "seed": 7},
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        singles = [await stream_via_descriptor(session, mono.url, task, b) for b in bodies]
        before = get_json(mono.url, "/stats")
        together = await asyncio.gather(*(stream_via_descriptor(session, mono.url, task, b) for b in bodies))
    stats = get_json(mono.url, "/stats")
    for (single_text, single_chunks), (text, chunks) in zip(singles, together, strict=True):
        assert text == single_text
        assert single_chunks[-1].usage == chunks[-1].usage
    assert 2 <= stats["max_batch_size_observed"] <= 4, stats  # the executor runs with --max-batch-size 4
    assert stats["sequences_finished"] - before["sequences_finished"] == len(bodies)
    # Decode batching: several sequences shared one forward, so forwards trail tokens by far.
    assert 2 <= stats["max_decode_batch_observed"] <= 4, stats
    tokens = stats["tokens_generated"] - before["tokens_generated"]
    assert tokens == sum(c[-1].usage.completion_tokens for _, c in together if c[-1].usage is not None)
    assert stats["steps"] - before["steps"] < tokens, (stats, before)
    assert stats["decode_forwards"] - before["decode_forwards"] < tokens - len(bodies), (stats, before)


async def test_health_and_stats_answer_between_steps_while_a_stream_runs_on_the_loop(
    cluster: LLMExecutorSetup,
) -> None:
    """Decode steps may run on the event loop (engine.py): the server must still answer meanwhile."""
    mono = cluster.monolithic["qwen2-vl"]
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_completion_tokens": 64,
        "stream": True,
    }
    answered_while_active = 0
    async with (
        aiohttp.ClientSession() as session,
        asyncio.timeout(120),
        session.post(mono.url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        lines = 0
        async for raw in resp.content:
            lines += raw.startswith(b"data: ")
            if lines in (2, 6, 10):  # mid-stream: the sequence is still being generated
                async with session.get(mono.url + "/health") as health:
                    assert health.status == 200 and (await health.json())["status"] == "ok"
                async with session.get(mono.url + "/stats") as stats_resp:
                    answered_while_active += (await stats_resp.json())["active"] == 1
    # (Whether the steps ran inline depends on the executor's torch threads; the e2e apps run it on
    # one CPU slot, i.e. one thread, where they do.)
    assert answered_while_active >= 1


async def test_sampling_is_reproducible_with_a_seed_and_varies_without(cluster: LLMExecutorSetup) -> None:
    mono = cluster.monolithic["llava"]
    task = LLMTask(model_id="tiny")
    body = {
        "messages": [{"role": "user", "content": "Sample"}],
        "max_completion_tokens": 16,
        "temperature": 1.5,
    }
    async with aiohttp.ClientSession() as session:
        a, _ = await stream_via_descriptor(session, mono.url, task, {**body, "seed": 123})
        b, _ = await stream_via_descriptor(session, mono.url, task, {**body, "seed": 123})
        unseeded = {(await stream_via_descriptor(session, mono.url, task, body))[0] for _ in range(3)}
    assert a == b
    assert len(unseeded) > 1


def metrics_page(url: str) -> dict[str, float]:
    """The executor's /metrics, parsed by prometheus-client: sample name -> value (no labels here)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_agree_with_stats_and_count_every_token(cluster: LLMExecutorSetup) -> None:
    mono = cluster.monolithic["llava"]
    before, stats_before = metrics_page(mono.url), get_json(mono.url, "/stats")
    status, full = post_json(mono.url, {"messages": [{"role": "user", "content": "Count"}], "max_tokens": 6})
    assert status == 200, full
    after, stats = metrics_page(mono.url), get_json(mono.url, "/stats")
    tokens = full["usage"]["completion_tokens"]
    assert after["cornserve_llm_generated_tokens_total"] == stats["tokens_generated"]
    assert after["cornserve_llm_sequences_finished_total"] == stats["sequences_finished"]
    assert stats["tokens_generated"] - stats_before["tokens_generated"] == tokens
    ttft = "cornserve_llm_time_to_first_token_seconds_count"
    tpot = "cornserve_llm_time_per_output_token_seconds_count"
    assert after[ttft] - before[ttft] == 1
    assert after[tpot] - before[tpot] == tokens - 1
    assert after["cornserve_llm_sequences_running"] == 0


# ---------------------------------------------------------------------- non-streaming, stop, length


def test_non_streaming_length_and_stop_strings(cluster: LLMExecutorSetup) -> None:
    mono = cluster.monolithic["llava"]
    body = {"messages": image_messages(png_data_url(seed=3), "Go"), "max_tokens": 10}
    status, full = post_json(mono.url, body)
    assert status == 200, full
    assert full["object"] == "chat.completion"
    choice = full["choices"][0]
    assert choice["finish_reason"] == "length"
    assert full["usage"]["completion_tokens"] == 10
    text = choice["message"]["content"]
    assert len(text) >= 4, text

    stop = text[2:4]
    status, stopped = post_json(mono.url, {**body, "stop": ["never-appears", stop]})
    assert status == 200, stopped
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert stopped["usage"]["completion_tokens"] <= 10

    status, short = post_json(mono.url, {**body, "max_completion_tokens": 3, "max_tokens": 50})
    assert status == 200 and short["usage"]["completion_tokens"] == 3


def test_text_assembler_holds_back_a_stop_string_split_across_tokens(tiny_models: dict[str, Path]) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_models["qwen2-vl"]).tokenizer  # type: ignore[no-untyped-call]
    ids = tokenizer("hello world, goodbye", add_special_tokens=False)["input_ids"]
    assembler = TextAssembler(tokenizer, ["world, g"])
    out = ""
    for token in ids:
        out += assembler.add(token)
        if assembler.stopped:
            break
    assert assembler.stopped
    assert out == "hello "


# ---------------------------------------------------------------------- bad inputs


def assert_error(status: int, body: Any, expect_status: int, error_type: str, *needles: str) -> None:
    assert status == expect_status, body
    error = body["error"]
    assert error["type"] == error_type, error
    for needle in needles:
        assert needle in error["message"], error


def test_bad_inputs_are_client_errors_and_the_executor_stays_up(
    cluster: LLMExecutorSetup, tmp_path: Path
) -> None:
    mono = cluster.monolithic["qwen2-vl"]
    garbage = tmp_path / "not-an-image.png"
    garbage.write_bytes(b"definitely not a png")
    cases: list[tuple[dict[str, Any], int, str, tuple[str, ...]]] = [
        ({"messages": image_messages("data:image/png;base64,AAAA", "x")}, 400, "invalid_media", ("image",)),
        ({"messages": image_messages(garbage.as_uri(), "x")}, 400, "invalid_media", ("decodable",)),
        ({"messages": image_messages((tmp_path / "missing.png").as_uri(), "x")}, 400, "invalid_media", ("cannot be read",)),
        ({"messages": image_messages(png_data_url(1), "x"), "max_completion_tokens": 100_000}, 400,
         "context_length_exceeded", ("4096",)),
        ({"messages": [{"role": "user", "content": "x"}], "cornserve_embeddings": [{"id": "abc"}]}, 400,
         "invalid_request_error", ("--receive-embeddings",)),
        ({"messages": []}, 400, "invalid_request_error", ("messages",)),
        ({"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "data:,"}}]}]}, 400,
         "invalid_request_error", ("audio",)),
    ]  # fmt: skip
    for body, status_expected, error_type, needles in cases:
        status, reply = post_json(mono.url, body)
        assert_error(status, reply, status_expected, error_type, *needles)
    for stream in (False, True):
        status, reply = post_json(
            mono.url, {"messages": image_messages("file:///nope.png", "x"), "stream": stream}
        )
        assert_error(status, reply, 400, "invalid_media", "cannot be read")

    # The media policy through a real executor: no filesystem oracle, no port scanner.
    replies = []
    for url in ("file:///etc/passwd", (tmp_path / "missing.png").as_uri(), "file:///nonexistent/x.png"):
        status, reply = post_json(mono.url, {"messages": image_messages(url, "x")})
        assert status == 400, reply
        replies.append(reply["error"]["message"].replace(repr(shorten_url(url)), "<url>"))
    assert len(set(replies)) == 1, replies
    assert "not in an allowed media directory or cannot be read" in replies[0]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        status, reply = post_json(
            mono.url, {"messages": image_messages(f"http://127.0.0.1:{port}/x.png", "x")}
        )
        assert_error(status, reply, 400, "invalid_media", "address is not allowed")
        time.sleep(0.2)
        with pytest.raises(BlockingIOError):  # nobody connected
            listener.accept()

    llava = cluster.monolithic["llava"]
    video = {
        "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:,"}}]}]
    }
    assert_error(*post_json(llava.url, video), 400, "invalid_request_error", "video")

    status, reply = post_json(
        mono.url, {"messages": [{"role": "user", "content": "still alive?"}], "max_tokens": 2}
    )
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    assert get_json(mono.url, "/health")["status"] == "ok"
    assert get_json(mono.url, "/v1/models")["data"][0]["id"] == str(cluster.models["qwen2-vl"])


async def test_fission_errors_name_the_forward_and_the_executor_stays_up(
    cluster: LLMExecutorSetup, nats_url: str
) -> None:
    fis = cluster.fission["qwen2-vl"]
    assert fis.sidecar_rank is not None
    url = png_data_url(seed=2)
    never = DataForward[Tensor](id=f"never-{uuid.uuid4().hex}", dst_sidecar_ranks=[[fis.sidecar_rank]])
    body: dict[str, Any] = {
        "messages": image_messages(url, "x"),
        "cornserve_embeddings": [never.model_dump(mode="json")],
    }
    status, reply = await asyncio.to_thread(post_json, fis.url, body)
    assert_error(status, reply, 504, "embedding_timeout", never.id)

    status, reply = await asyncio.to_thread(post_json, fis.url, {"messages": image_messages(url, "x")})
    assert_error(status, reply, 400, "invalid_request_error", "0 cornserve_embeddings")

    # An embedding of the wrong width for this LLM is refused with the forward id.
    bad = DataForward[Tensor](dst_sidecar_ranks=[[fis.sidecar_rank]])
    async with Sidecar(cluster.producer_rank, nats_url) as producer:
        meta = EmbeddingMeta(modality="image", num_tokens=4, grid_thw=[1, 4, 4], model_id="x")
        await send_embedding(producer, bad.id, [[fis.sidecar_rank]], torch.zeros(4, 3), meta)
    body = {
        "messages": image_messages(url, "x"),
        "cornserve_embeddings": [bad.model_dump(mode="json")],
        "stream": True,
    }
    status, reply = await asyncio.to_thread(post_json, fis.url, body)
    assert_error(status, reply, 400, "invalid_embedding", bad.id, "[4, 3]")

    # A tensor whose dtype is not the one its metadata names (chunks that disagree) is refused.
    liar = DataForward[Tensor](dst_sidecar_ranks=[[fis.sidecar_rank]])
    async with Sidecar(cluster.producer_rank, nats_url) as producer:
        meta = EmbeddingMeta(
            modality="image", num_tokens=4, grid_thw=[1, 4, 4], model_id="x", dtype="bfloat16"
        )
        await send_embedding(producer, liar.id, [[fis.sidecar_rank]], torch.zeros(4, 64), meta)
    body["cornserve_embeddings"] = [liar.model_dump(mode="json")]
    status, reply = await asyncio.to_thread(post_json, fis.url, body)
    assert_error(status, reply, 400, "invalid_embedding", liar.id, "metadata says bfloat16")
    assert get_json(fis.url, "/health")["status"] == "ok"


def test_stream_error_line_is_a_task_execution_error() -> None:
    task = LLMTask(model_id="tiny")
    inv = invocation(task, {"messages": [{"role": "user", "content": "x"}]})
    line = "data: " + json.dumps({"error": {"message": "boom", "type": "internal_error"}})
    with pytest.raises(TaskExecutionError, match="boom"):
        DESCRIPTOR.from_stream_line(task, inv, line)


def test_command_line_of_the_descriptor_is_accepted() -> None:
    task = LLMTask(model_id="/models/tiny", receive_embeddings=True)
    placement = ExecutorPlacement.model_validate(
        {"executor_id": "ex-1", "host": "127.0.0.1", "port": 8123, "sidecar_ranks": [3, 4], "devices": [],
         "nats_url": "nats://127.0.0.1:4222"}
    )  # fmt: skip
    spec = CPULLMDescriptor(max_batch_size=5).launch_spec(task, placement)
    assert spec.command[1:3] == ["-m", "cornserve.llm_executor"]
    config = parse_settings(LLMExecutorSettings, spec.command[3:])
    assert (config.model_id, config.port, config.max_batch_size) == ("/models/tiny", 8123, 5)
    assert config.sidecar_ranks == [3, 4] and config.receive_embeddings


def bare_completion(request_id: str) -> tuple[ChatServer, Completion]:
    """A chat server without an engine or model, and an admitted completion: for `_stream` alone."""
    server = ChatServer(LLMExecutorSettings(model_id="tiny"), cast(Any, None), cast(Any, None), None)
    ids = torch.zeros((1, 3), dtype=torch.long)
    prompt = PreparedPrompt(input_ids=ids, position_ids=ids)
    seq = Sequence(request_id=request_id, prompt=prompt, params=SamplingParams(), max_tokens=8)
    return server, Completion(id=request_id, created=0, model="tiny", prompt=prompt, seq=seq, stop=[])


def stream_app(
    server: ChatServer, completion: Completion, pieces: Callable[[], AsyncIterator[Piece]]
) -> web.Application:
    """An app whose chat route streams `pieces()` through the server's `_stream`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return await server._stream(request, completion, pieces(), True)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


@asynccontextmanager
async def posted_stream(app: web.Application) -> AsyncIterator[aiohttp.ClientResponse]:
    """The app served on a test server and its chat route posted to: the response, checked 200."""
    async with (
        TestServer(app) as ts,
        aiohttp.ClientSession() as session,
        asyncio.timeout(30),
        session.post(ts.make_url("/v1/chat/completions"), json={}) as resp,
    ):
        assert resp.status == 200
        yield resp


async def test_a_failure_after_the_stream_started_is_an_sse_error_line() -> None:
    """Mid-stream failures cannot change the HTTP status; the dispatcher must still see an error."""
    server, completion = bare_completion("chatcmpl-x")

    async def pieces() -> AsyncIterator[Piece]:
        yield Piece("a")
        yield Piece("b")
        raise GenerationFailed("the model broke")

    app = stream_app(server, completion, pieces)
    task = LLMTask(model_id="tiny")
    inv = invocation(task, {"messages": [{"role": "user", "content": "x"}]})
    texts: list[str] = []
    async with posted_stream(app) as resp:
        with pytest.raises(TaskExecutionError, match="the model broke"):
            async for raw in resp.content:
                chunk = DESCRIPTOR.from_stream_line(task, inv, raw.decode())
                if chunk is not None and chunk.choices:
                    texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == "ab"
    assert server.requests_failed == 1


async def test_a_stream_starts_before_its_prefill_and_a_failed_prefill_is_its_only_line() -> None:
    """The headers leave before the first token (the dispatcher answers its caller meanwhile).

    A prefill that then fails sends no role chunk, only the error line: the dispatcher's relay
    fails the stream before any item, which the gateway still answers with an HTTP error.
    """
    server, completion = bare_completion("chatcmpl-y")
    headers_seen = asyncio.Event()

    async def pieces() -> AsyncIterator[Piece]:
        await headers_seen.wait()  # the prefill "runs" until the client has the response's headers
        raise GenerationFailed("the prefill broke")
        yield Piece("never")  # pragma: no cover - makes this an async generator

    app = stream_app(server, completion, pieces)
    async with posted_stream(app) as resp:
        assert resp.headers["X-Request-Id"] == "chatcmpl-y"
        headers_seen.set()
        lines = [raw.decode().strip() async for raw in resp.content if raw.strip()]
    assert len(lines) == 1, lines
    body = json.loads(lines[0].removeprefix("data: "))
    assert body["error"]["code"] == 500 and "the prefill broke" in body["error"]["message"]
    assert server.requests_failed == 1


async def test_the_port_opens_first_and_health_is_503_while_the_model_loads() -> None:
    settings = LLMExecutorSettings(model_id="/models/not-loaded-yet", port=free_port())
    executor = LLMExecutor(settings)
    await executor.start_http()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/health", "/v1/models"):
                async with http.get(f"http://127.0.0.1:{settings.port}{path}") as resp:
                    assert resp.status == 503
                    assert (await resp.json())["status"] == "loading"
    finally:
        await executor.stop()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.slow  # ~15 s plus teardown: a whole executor start that fails late
def test_device_cuda_without_cuda_exits_1_saying_so(tiny_models: dict[str, Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cornserve.llm_executor", "--model-id", str(tiny_models["qwen2-vl"]),
         "--port", str(free_port()), "--device", "cuda:0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "--device cuda:0: no CUDA device is visible" in proc.stderr


@pytest.mark.slow  # ~11 s plus teardown: loading fails only after the import of torch and transformers
def test_a_model_that_cannot_load_exits_1(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cornserve.llm_executor", "--model-id", str(tmp_path / "missing"),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "llm-executor failed to start" in proc.stderr


def test_text_chars_counts_the_text_of_every_message() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "abc"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "de"}]},
                {"role": "assistant", "content": None},
            ]
        }
    )  # fmt: skip
    assert text_chars(request) == 5


# ---------------------------------------------------------------------- published streams


async def published(
    nats_url: str, url: str, body: dict[str, Any]
) -> tuple[aiohttp.ClientResponse, bytes, list[StreamMessage]]:
    """POST `body` asking the executor to publish its stream; the response, its body, the messages on NATS."""
    nc = await connect_nats(nats_url, name="test-published-stream")
    subject = f"_INBOX_gateway.{uuid.uuid4().hex}.{uuid.uuid4().hex[:8]}.stream"
    messages: list[StreamMessage] = []
    try:
        sub = await nc.subscribe(subject)
        await nc.flush()
        async with (
            aiohttp.ClientSession() as session,
            asyncio.timeout(60),
            session.post(url, json=body, headers={STREAM_SUBJECT_HEADER: subject}) as resp,
        ):
            data = await resp.read()
        if resp.headers.get(STREAM_PUBLISHED_HEADER) == "1":
            end = PublishedStreamEnd.model_validate_json(data.strip().splitlines()[-1])
            for _ in range(end.messages):
                messages.append(StreamMessage.model_validate_json((await sub.next_msg(timeout=10)).data))
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.2)  # nothing more
    finally:
        await nc.close()
    return resp, data, messages


async def test_a_stream_it_may_publish_goes_to_the_subject_with_the_chunks_of_the_sse_stream(
    cluster: LLMExecutorSetup, nats_url: str
) -> None:
    """Same chunks, same order as over SSE, numbered from 0, the last message with `end`; the body says how it ended."""
    mono = cluster.monolithic["qwen2-vl"]
    task = LLMTask(model_id="tiny")
    body = {"messages": [{"role": "user", "content": "Publish"}], "max_completion_tokens": MAX_TOKENS}
    request = DESCRIPTOR.to_request(task, invocation(task, body))
    before = get_json(mono.url, "/stats")["published_streams"]
    resp, data, messages = await published(nats_url, mono.url + request.path, request.body)
    assert resp.status == 200 and resp.headers[STREAM_PUBLISHED_HEADER] == "1"
    end = PublishedStreamEnd.model_validate_json(data.strip().splitlines()[-1])
    assert end.end and end.line is None and end.messages == len(messages)
    assert [m.seq for m in messages] == list(range(len(messages)))
    assert [m.end for m in messages] == [False] * (len(messages) - 1) + [True]
    assert not any(m.error or m.abort for m in messages)
    items = [item for m in messages for item in ([m.item] if m.item is not None else m.items or [])]
    assert end.items == len(items)
    async with aiohttp.ClientSession() as session:
        _, sse_chunks = await stream_via_descriptor(session, mono.url, task, body)
    expected = [c.model_dump(exclude={"id", "created"}) for c in sse_chunks]
    assert [
        ChatCompletionChunk.model_validate(i).model_dump(exclude={"id", "created"}) for i in items
    ] == expected
    assert items[-1]["usage"] is not None and len(items) > 3  # role, tokens, finish, usage
    assert get_json(mono.url, "/stats")["published_streams"] == before + 1
    # A subject that is not a plain subject is not published on: the stream comes over SSE.
    async with aiohttp.ClientSession() as session:
        bad = {STREAM_SUBJECT_HEADER: "_INBOX_gateway.*.stream"}
        async with session.post(mono.url + request.path, json=request.body, headers=bad) as resp:
            text = await resp.text()
    assert STREAM_PUBLISHED_HEADER not in resp.headers and text.rstrip().endswith("data: [DONE]")


async def test_a_published_stream_that_fails_leaves_its_error_and_count_to_the_dispatcher(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The items before the failure are published; the body's last line carries the error line and the count."""
    monkeypatch.setattr(publish, "BEAT_INTERVAL_S", 0.0)  # a newline after every message
    server, completion = bare_completion("chatcmpl-p")
    publisher = publish.StreamPublisher(nats_url, None, "test-executor")
    publisher.start()
    await wait_for_async(lambda: publisher._nc is not None and publisher._nc.is_connected, 10)
    server.publisher = publisher

    async def pieces() -> AsyncIterator[Piece]:
        yield Piece("a")
        yield Piece("b")
        raise GenerationFailed("the model broke")

    app = stream_app(server, completion, pieces)
    try:
        async with TestServer(app) as ts:
            resp, data, messages = await published(nats_url, str(ts.make_url("/v1/chat/completions")), {})
    finally:
        await publisher.close()
    assert resp.headers[STREAM_PUBLISHED_HEADER] == "1"
    lines = data.split(b"\n")
    assert lines[:2] == [b"", b""] and lines[-1] == b""  # a newline after each of the two messages
    end = PublishedStreamEnd.model_validate_json(lines[-2])
    assert (end.end, end.messages, end.items) == (False, 2, 3)  # role + "a", then "b"
    assert [m.seq for m in messages] == [0, 1] and not any(m.end for m in messages)
    task = LLMTask(model_id="tiny")
    with pytest.raises(TaskExecutionError, match="the model broke"):
        inv = invocation(task, {"messages": [{"role": "user", "content": "x"}]})
        DESCRIPTOR.stream_item_json(task, inv, end.line or "")
    assert server.requests_failed == 1 and publisher.published == 1


async def wait_for_async(ready: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not ready():
            await asyncio.sleep(0.01)
