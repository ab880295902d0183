"""Thinker → sidecar stream → talker, on two real LLM executor processes and real sidecars.

The thinker executor (`--forward-hidden-states`) answers a chat request and sends each generated
token's last-layer hidden state through its sidecar; the talker executor (`--receive-input-embeds`)
generates one token per hidden state from the same stream forward. Both are compared token for
token with the in-process transformers reference (`cornserve.models.thinker_talker`).

The thinker's sidecar arena holds only `ARENA_CHUNKS` single-row chunks, so its sends wait for the
talker to read (backpressure): the thinker cannot finish before the talker has used most of its
hidden states, which makes "the talker's first token arrives before the thinker's answer" an
order of events, not a race.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from tests.support.cluster import ProcessCluster
from tests.support.plugin import TinyCheckpoint
from tests.support.processes import ServiceProcess, python_module
from tests.support.sidecars import LLM_EXECUTOR_RANKS, sidecar_stats
from tests.support.waiting import wait_healthy
from transformers import AutoModelForCausalLM, AutoTokenizer

from cornserve.models.thinker_talker import chat_prompt_ids, talker_reference, thinker_reference
from cornserve.runtime.process import free_port
from cornserve.sidecar import Sidecar
from cornserve.task import DataForward, Stream, Tensor
from cornserve.task.builtins import EmbedsGenerationRequest, HiddenStatesTarget, TalkerChunk
from cornserve.task.builtins.thinker_talker import GENERATE_FROM_EMBEDS_PATH, HIDDEN_STATES_FIELD

pytestmark = pytest.mark.slow  # a thinker and a talker executor for the module

HIDDEN = 64
ARENA_CHUNKS = 4
ARENA_BYTES = ARENA_CHUNKS * HIDDEN * 4
"""The thinker's arena: room for 4 one-token chunks of 64 float32."""
THINKER_TOKENS = 40
PROMPT = "Describe a cat on a red chair."


@dataclass
class Pair:
    thinker_url: str
    talker_url: str
    thinker_rank: int
    talker_rank: int
    nats_url: str
    thinker_dir: Path
    talker_dir: Path
    services: list[ServiceProcess]


def _start(
    cluster: ProcessCluster, model: Path, name: str, rank: int, role: str
) -> tuple[str, ServiceProcess]:
    port = free_port()
    cmd = python_module(
        "cornserve.llm_executor",
        "--model-id", str(model),
        "--port", str(port),
        "--max-batch-size", "4",
        "--sidecar-ranks", str(rank),
        role,
        "--embedding-timeout-s", "30",
    )  # fmt: skip
    service = cluster.start_service(
        name, cmd, {"CORNSERVE_NATS_URL": cluster.nats_url, "CORNSERVE_EXECUTOR_ID": name}
    )
    return f"http://127.0.0.1:{port}", service


@pytest.fixture(scope="module")
def pair(
    tiny_checkpoint: TinyCheckpoint, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    thinker_dir, talker_dir = tiny_checkpoint("qwen2-thinker"), tiny_checkpoint("qwen2-talker")
    with ProcessCluster(
        tmp_path_factory.mktemp("thinker-talker-logs"), nats_url, LLM_EXECUTOR_RANKS
    ) as cluster:
        thinker_sc, talker_sc = cluster.start_sidecars(2, arena_bytes=ARENA_BYTES, ttl_s=300.0)
        thinker_url, thinker = _start(
            cluster, thinker_dir, "thinker", thinker_sc.rank, "--forward-hidden-states"
        )
        talker_url, talker = _start(cluster, talker_dir, "talker", talker_sc.rank, "--receive-input-embeds")
        for url, service in ((thinker_url, thinker), (talker_url, talker)):
            wait_healthy(url, process=service)
        yield Pair(
            thinker_url, talker_url, thinker_sc.rank, talker_sc.rank, cluster.nats_url, thinker_dir, talker_dir,
            [thinker, talker],
        )  # fmt: skip
        for service in (thinker, talker):
            assert "Traceback" not in service.log(), f"{service.name} logged a traceback:\n{service.log()}"


@dataclass
class Reference:
    thinker_tokens: list[int]
    thinker_text: str
    hidden: torch.Tensor
    talker: Any


def _reference(pair: Pair, max_talker_tokens: int) -> Reference:
    thinker = AutoModelForCausalLM.from_pretrained(pair.thinker_dir).eval()
    talker = AutoModelForCausalLM.from_pretrained(pair.talker_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(pair.thinker_dir)
    ref = thinker_reference(thinker, chat_prompt_ids(tokenizer, PROMPT), THINKER_TOKENS)
    eos = talker.generation_config.eos_token_id
    talked = talker_reference(
        talker, ref.hidden_states, max_talker_tokens, set(eos if isinstance(eos, list) else [eos])
    )
    text = tokenizer.decode(ref.token_ids, skip_special_tokens=True)
    return Reference(ref.token_ids, text, ref.hidden_states, talked)


def _forward(pair: Pair) -> DataForward[Stream[Tensor]]:
    return DataForward[Stream[Tensor]](
        src_sidecar_ranks=[pair.thinker_rank], dst_sidecar_ranks=[[pair.talker_rank]]
    )


def _thinker_body(
    forward: DataForward[Stream[Tensor]], tokens_per_chunk: int = 1, stream: bool = False
) -> dict[str, Any]:
    return {
        "stream": stream,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": PROMPT}],
        "max_completion_tokens": THINKER_TOKENS,
        "temperature": 0,
        HIDDEN_STATES_FIELD: HiddenStatesTarget(
            forward=forward, tokens_per_chunk=tokens_per_chunk
        ).model_dump(mode="json"),
    }


def _talker_body(forward: DataForward[Stream[Tensor]], max_tokens: int) -> dict[str, Any]:
    return EmbedsGenerationRequest(input_embeds=forward, max_tokens=max_tokens).model_dump(mode="json")


async def _streamed_completion(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """A streamed chat answer folded into the fields the tests read: the text and the usage."""
    text, usage = [], None
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        payload = json.loads(line[len("data:") :])
        assert "error" not in payload, payload
        text += [c["delta"].get("content") or "" for c in payload["choices"]]
        usage = payload.get("usage") or usage
    return {"choices": [{"message": {"content": "".join(text)}}], "usage": usage}


async def _run_pair(
    pair: Pair, tokens_per_chunk: int, max_talker_tokens: int, thinker_streams: bool = False
) -> tuple[dict[str, Any], list[TalkerChunk], list[str]]:
    """Both requests at once; `events` records, in the order seen, the talker's first chunk and the thinker's answer."""
    forward = _forward(pair)
    events: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def think() -> dict[str, Any]:
            async with session.post(
                pair.thinker_url + "/v1/chat/completions",
                json=_thinker_body(forward, tokens_per_chunk, thinker_streams),
            ) as resp:
                assert resp.status == 200, await resp.text()
                body = await _streamed_completion(resp) if thinker_streams else await resp.json()
                events.append("thinker answered")
                return body

        async def talk() -> list[TalkerChunk]:
            chunks: list[TalkerChunk] = []
            async with session.post(
                pair.talker_url + GENERATE_FROM_EMBEDS_PATH, json=_talker_body(forward, max_talker_tokens)
            ) as resp:
                assert resp.status == 200, await resp.text()
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    payload = json.loads(line[len("data:") :])
                    assert "error" not in payload, payload
                    if not chunks:
                        events.append("talker first token")
                    chunks.append(TalkerChunk.model_validate(payload))
            return chunks

        thinker_body, chunks = await asyncio.gather(think(), talk())
    return thinker_body, chunks, events


async def _arenas_empty(pair: Pair) -> None:
    """Every chunk of the stream was released (the talker marked each done, or drained it)."""
    async with asyncio.timeout(30):
        while True:
            stats = await sidecar_stats(pair.nats_url, [pair.thinker_rank, pair.talker_rank])
            if all(s.used_bytes == 0 and s.held_entries == 0 for s in stats.values()):
                return
            await asyncio.sleep(0.1)


@pytest.mark.parametrize(("tokens_per_chunk", "thinker_streams"), [(1, False), (3, True)])
async def test_talker_equals_the_reference_and_starts_before_the_thinker_finishes(
    pair: Pair, tokens_per_chunk: int, thinker_streams: bool
) -> None:
    """One token per chunk with a whole thinker answer; 3 per chunk alongside a streamed answer."""
    ref = _reference(pair, max_talker_tokens=200)
    # Backpressure makes the order certain only if the stream is longer than the arena holds
    # (plus the talker's read-ahead of 2 rows and its first row).
    assert len(ref.thinker_tokens) >= ARENA_CHUNKS * tokens_per_chunk + 4, ref.thinker_tokens

    thinker, chunks, events = await _run_pair(pair, tokens_per_chunk, 200, thinker_streams)

    assert thinker["choices"][0]["message"]["content"] == ref.thinker_text
    assert thinker["usage"]["completion_tokens"] == len(ref.thinker_tokens)
    tokens = [c.token_id for c in chunks if c.token_id is not None]
    assert tokens == ref.talker.token_ids
    assert chunks[-1].finish_reason == ref.talker.finish_reason
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert events == ["talker first token", "thinker answered"]
    first = chunks[0]
    assert first.inputs_received < len(ref.thinker_tokens) and not first.inputs_complete
    # The talker reads at most 2 rows (plus one chunk) ahead of what it has used.
    assert all(c.inputs_received <= c.index + 2 + tokens_per_chunk for c in chunks)
    await _arenas_empty(pair)


async def test_a_talker_that_stops_early_drains_the_rest_so_the_thinker_finishes(pair: Pair) -> None:
    """The talker stops after 3 of 40 rows and drains the rest (docs/reliability.md, "Early-stop drain")."""
    ref = _reference(pair, max_talker_tokens=3)
    thinker, chunks, _ = await _run_pair(pair, tokens_per_chunk=1, max_talker_tokens=3)
    assert [c.token_id for c in chunks] == ref.talker.token_ids
    assert chunks[-1].finish_reason == ref.talker.finish_reason == "length"
    assert thinker["usage"]["completion_tokens"] == len(ref.thinker_tokens)  # not stuck on a full arena
    await _arenas_empty(pair)


async def test_roles_are_refused_where_they_are_off(pair: Pair) -> None:
    forward = _forward(pair)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(
            pair.talker_url + "/v1/chat/completions", json=_thinker_body(forward)
        ) as resp:
            assert resp.status == 400
            assert "--forward-hidden-states" in (await resp.json())["error"]["message"]
        async with session.post(
            pair.thinker_url + GENERATE_FROM_EMBEDS_PATH, json=_talker_body(forward, 4)
        ) as resp:
            assert resp.status == 400
            assert "--receive-input-embeds" in (await resp.json())["error"]["message"]
        unwired = _thinker_body(DataForward[Stream[Tensor]]())
        async with session.post(pair.thinker_url + "/v1/chat/completions", json=unwired) as resp:
            assert resp.status == 400
            assert "destination sidecar ranks" in (await resp.json())["error"]["message"]
        bad = _talker_body(forward, 4) | {"max_tokens": 0}
        async with session.post(pair.talker_url + GENERATE_FROM_EMBEDS_PATH, json=bad) as resp:
            assert resp.status == 400


async def test_embeddings_of_another_width_are_refused_before_the_stream_starts(pair: Pair) -> None:
    forward = _forward(pair)
    async with Sidecar(pair.thinker_rank, nats_url=pair.nats_url) as producer:
        await producer.send(
            torch.zeros(1, HIDDEN // 2), forward.id, [[pair.talker_rank]], chunk_id=0, num_chunks=None
        )
        await producer.close_stream(forward.id, 1, [[pair.talker_rank]])
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.post(pair.talker_url + GENERATE_FROM_EMBEDS_PATH, json=_talker_body(forward, 4)) as resp,
        ):
            body = await resp.json()
        assert resp.status == 400 and body["error"]["type"] == "invalid_embedding", body
        assert f"hidden size {HIDDEN}" in body["error"]["message"]
    await _arenas_empty(pair)
