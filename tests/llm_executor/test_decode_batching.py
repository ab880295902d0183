"""Decode batching in the engine, in process: one forward per decode step, same tokens as alone.

The oracle is the engine with `decode_batching=False` (one forward per sequence, checked against
transformers' `generate` in test_llm_executor.py) running each request by itself; the batched
engine must reproduce it token for token while sequences of different lengths, media and M-RoPE
offsets join and leave the padded batch between steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cornserve.llm_executor.batch_cache import BatchedDecodeCache
from cornserve.llm_executor.config import LLMExecutorSettings
from cornserve.llm_executor.engine import Engine, Sequence
from cornserve.llm_executor.errors import GenerationFailed
from cornserve.llm_executor.model import LoadedModel, load_model
from cornserve.llm_executor.prompt import PreparedPrompt, prepare_with_media
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.runtime.settings import parse_settings
from cornserve.task.builtins.chat import ChatCompletionRequest
from cornserve.task.builtins.modality import Modality

TOKEN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    """One request: its text, optional image, decoding parameters and token budget."""

    text: str
    image_seed: int | None = None
    max_tokens: int = 8
    params: SamplingParams = field(default_factory=SamplingParams)


CASES = [
    Case("Hi", max_tokens=6),
    Case("Describe the picture in great detail, please, and be thorough.", image_seed=1, max_tokens=20),
    Case("Colors?", image_seed=2, max_tokens=12),
    Case("Tell me a long story about a cat.", max_tokens=16),
    Case("Sample", max_tokens=14, params=SamplingParams(temperature=0.9, top_p=0.8, seed=7)),
    Case("A much longer prompt that arrives late " * 6, max_tokens=10),
]


@pytest.fixture(scope="module")
def loaded_models(tiny_models: dict[str, Path]) -> Iterator[dict[str, LoadedModel]]:
    out = {}
    for arch, path in tiny_models.items():
        loaded = load_model(str(path))
        loaded.eos_token_ids = frozenset()  # every request runs its whole budget: lengths under control
        out[arch] = loaded
    yield out


def prompt_of(loaded: LoadedModel, case: Case) -> PreparedPrompt:
    content: list[dict[str, Any]] = []
    media: list[tuple[Modality, Any]] = []
    if case.image_seed is not None:
        rng = torch.Generator().manual_seed(case.image_seed)
        pixels = torch.randint(0, 255, (40, 48 + 8 * case.image_seed, 3), generator=rng, dtype=torch.uint8)
        media.append((Modality.IMAGE, Image.fromarray(pixels.numpy())))
        content.append({"type": "image_url", "image_url": {"url": "data:,"}})
    content.append({"type": "text", "text": case.text})
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": content}]})
    return prepare_with_media(loaded, request, media)


async def collect(engine: Engine, seq: Sequence) -> list[int]:
    return [
        event.token_id async for event in engine.tokens(seq, TOKEN_TIMEOUT_S) if event.token_id is not None
    ]


async def alone(loaded: LoadedModel, cases: list[Case]) -> list[list[int]]:
    """Each case by itself on the unbatched path: the reference."""
    engine = Engine(loaded, 4, decode_batching=False)
    engine.start()
    try:
        out = []
        for i, case in enumerate(cases):
            seq = engine.submit(f"alone-{i}", prompt_of(loaded, case), case.params, case.max_tokens)
            out.append(await collect(engine, seq))
        return out
    finally:
        await engine.close()


INLINE_BUDGETS = {"inline": float("inf"), "worker-thread": 0.0}
"""`inline_step_budget_s` that runs every step without a prefill on the loop, and one that never does."""


@pytest.mark.parametrize("where", list(INLINE_BUDGETS))
@pytest.mark.parametrize("arch", ["qwen2-vl", "llava"])
async def test_batched_decoding_equals_each_request_alone_while_rows_join_and_leave(
    loaded_models: dict[str, LoadedModel], arch: str, where: str
) -> None:
    loaded = loaded_models[arch]
    reference = await alone(loaded, CASES)
    engine = Engine(loaded, 4, decode_batching=True, inline_step_budget_s=INLINE_BUDGETS[where])
    # Four requests are queued before the scheduler starts, so they prefill in one step and then
    # decode together; the short ones leave, and the last two join mid-flight (one with a prompt
    # longer than every live row, which widens the padded cache; one shorter, which is padded).
    first = [
        engine.submit(f"r{i}", prompt_of(loaded, case), case.params, case.max_tokens)
        for i, case in enumerate(CASES[:4])
    ]
    engine.start()
    try:
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            tasks = [asyncio.create_task(collect(engine, seq)) for seq in first]
            await tasks[0]  # the shortest finished: its row leaves the batch
            late = [
                engine.submit(f"r{i}", prompt_of(loaded, case), case.params, case.max_tokens)
                for i, case in [(5, CASES[5]), (4, CASES[4])]
            ]
            tasks += [asyncio.create_task(collect(engine, seq)) for seq in late]
            results = await asyncio.gather(*tasks)
    finally:
        await engine.close()
    by_case = [*results[:4], results[5], results[4]]
    for case, got, want in zip(CASES, by_case, reference, strict=True):
        assert len(got) == case.max_tokens
        assert got == want, case
    stats = engine.stats
    assert stats.max_decode_batch_observed == 4, stats
    assert stats.tokens_generated == sum(c.max_tokens for c in CASES)
    # One forward per decode step, however many rows it decoded.
    assert stats.decode_forwards <= stats.steps < stats.tokens_generated // 2, stats
    if where == "inline":  # every step but those with a prefill (and the first after start) ran on the loop
        assert 0 < stats.inline_steps < stats.steps, stats
    else:
        assert stats.inline_steps == 0, stats


async def test_inline_steps_yield_to_the_loop_between_any_two_steps(
    loaded_models: dict[str, LoadedModel],
) -> None:
    """With every step on the loop, other tasks (writers, /health, new requests) still run between steps."""
    loaded = loaded_models["qwen2-vl"]
    engine = Engine(loaded, 4, inline_step_budget_s=float("inf"))
    seen: set[int] = set()
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.add(engine.stats.steps)
            await asyncio.sleep(0)

    engine.start()
    watcher = asyncio.create_task(watch())
    try:
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            first = engine.submit("first", prompt_of(loaded, CASES[3]), SamplingParams(), 40)
            tokens = engine.tokens(first, TOKEN_TIMEOUT_S)
            for _ in range(10):
                await anext(tokens)
            # A request submitted while the loop runs inline steps joins the running batch.
            late = engine.submit("late", prompt_of(loaded, CASES[0]), SamplingParams(), 6)
            got_late = await collect(engine, late)
            rest = [event async for event in tokens]
    finally:
        done.set()
        await watcher
        await engine.close()
    assert len(got_late) == 6 and len(rest) == 30
    assert engine.stats.inline_steps > 30 and engine.stats.max_decode_batch_observed == 2, engine.stats
    assert set(range(1, engine.stats.steps + 1)) <= seen  # the watcher ran after every single step


async def test_decode_batching_off_runs_one_forward_per_sequence(
    loaded_models: dict[str, LoadedModel],
) -> None:
    loaded = loaded_models["qwen2-vl"]
    engine = Engine(loaded, 4, decode_batching=False)
    seqs = [engine.submit(f"r{i}", prompt_of(loaded, c), c.params, 5) for i, c in enumerate(CASES[:3])]
    engine.start()
    try:
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            await asyncio.gather(*(collect(engine, seq) for seq in seqs))
    finally:
        await engine.close()
    assert engine.stats.max_decode_batch_observed == 1
    assert engine.stats.decode_forwards == 3 * 4  # the first token of each comes from its prefill


def test_batched_cache_pads_on_the_left_and_trims_when_the_longest_row_leaves() -> None:
    def single(length: int, fill: float) -> DynamicCache:
        cache = DynamicCache()
        for layer in range(2):
            kv = torch.full((1, 2, length, 4), fill)
            cache.update(kv, kv.clone(), layer)
        return cache

    batch = BatchedDecodeCache()
    batch.add("a", single(3, 1.0))
    batch.add("b", single(5, 2.0))  # longer: the existing row is padded
    batch.add("c", single(2, 3.0))  # shorter: the new row is padded
    assert batch.width == 5 and len(batch) == 3
    assert batch.cache is not None
    keys = cast(DynamicLayer, batch.cache.layers[1]).keys
    assert keys is not None and keys.shape == (3, 2, 5, 4)
    assert torch.equal(keys[0, :, :2], torch.zeros(2, 2, 4))
    assert torch.equal(keys[0, :, 2:], torch.ones(2, 3, 4))
    assert torch.equal(keys[2, :, 3:], torch.full((2, 2, 4), 3.0))
    assert batch.attention_mask().tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 1, 1, 1]]

    batch.retain(["c", "a"])  # the longest row leaves; order stays the batch's
    assert batch.rows == ["a", "c"] and batch.width == 3
    keys = cast(DynamicLayer, batch.cache.layers[0]).keys
    assert keys is not None and keys.shape == (2, 2, 3, 4)
    assert torch.equal(keys[0], torch.ones(2, 3, 4))
    assert batch.attention_mask().tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="already"):
        batch.add("a", single(1, 0.0))
    batch.retain([])
    assert len(batch) == 0 and batch.cache is None


def test_decode_batching_flag() -> None:
    assert parse_settings(LLMExecutorSettings, ["--model-id", "m"]).decode_batching
    assert not parse_settings(
        LLMExecutorSettings, ["--model-id", "m", "--decode-batching", "off"]
    ).decode_batching
    with pytest.raises(SystemExit):
        parse_settings(LLMExecutorSettings, ["--model-id", "m", "--decode-batching", "maybe"])


async def test_a_failed_batched_forward_fails_its_rows_and_the_engine_keeps_serving(
    loaded_models: dict[str, LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = loaded_models["llava"]
    engine = Engine(loaded, 4)
    real_forward = engine._forward_rows

    def broken(rows: list[Sequence]) -> torch.Tensor:
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine, "_forward_rows", broken)
    seqs = [engine.submit(f"r{i}", prompt_of(loaded, c), c.params, 4) for i, c in enumerate(CASES[:2])]
    engine.start()
    try:
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            for seq in seqs:
                with pytest.raises(GenerationFailed, match="simulated kernel failure"):
                    await collect(engine, seq)
            monkeypatch.setattr(engine, "_forward_rows", real_forward)
            again = [
                engine.submit(f"s{i}", prompt_of(loaded, c), c.params, 4) for i, c in enumerate(CASES[:2])
            ]
            got = await asyncio.gather(*(collect(engine, seq) for seq in again))
    finally:
        await engine.close()
    assert got == await alone(loaded, [Case(c.text, c.image_seed, 4, c.params) for c in CASES[:2]])


async def test_a_cancelled_sequence_is_dropped_at_the_next_step(
    loaded_models: dict[str, LoadedModel],
) -> None:
    """What a cancelled request (its caller hung up) costs: at most the step already running."""
    loaded = loaded_models["qwen2-vl"]
    engine = Engine(loaded, 2)
    case = Case("Tell me a long story about a cat.")
    kept, dropped, queued = (
        engine.submit(name, prompt_of(loaded, case), case.params, 1000)
        for name in ("kept", "dropped", "queued")
    )
    engine.start()
    try:
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            dropped_tokens = engine.tokens(dropped, TOKEN_TIMEOUT_S)
            for _ in range(3):
                await anext(dropped_tokens)
            assert engine.stats.active == 2 and engine.stats.waiting == 1
            queued.cancel()  # still waiting for a batch slot: never started
            dropped.cancel()
            generated = len(dropped.generated)
            while engine.stats.active != 1 or engine.stats.sequences_cancelled != 2:
                await asyncio.sleep(0.01)
            steps = engine.stats.steps
            while engine.stats.steps < steps + 3:  # the survivor keeps generating alone
                await asyncio.sleep(0.01)
            assert len(dropped.generated) <= generated + 1  # the step already running, at most
            assert engine.stats.max_batch_size_observed == 2 and engine.stats.sequences_started == 2
            kept.cancel()
            while engine.stats.active != 0:
                await asyncio.sleep(0.01)
    finally:
        await engine.close()
    assert engine.stats.sequences_cancelled == 3 and engine.stats.sequences_finished == 0
