"""Short prefills on the event loop (`Engine.prefill_cost`), in process on the tiny checkpoints.

The first prefill of tokens or received embeddings runs on the worker thread and is measured;
later ones run inline when predicted within the budget. A prefill that runs the model's own media
encoder (pixel values) always runs on the thread. The tokens must not depend on where a prefill
ran: the reference is an engine that never runs a step inline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.llm_executor.test_decode_batching import CASES, Case, prompt_of

from cornserve.llm_executor.engine import Engine, Sequence
from cornserve.llm_executor.model import LoadedModel, load_model
from cornserve.llm_executor.prompt import PreparedPrompt

TOKEN_TIMEOUT_S = 120.0
TEXT_CASES = [c for c in CASES if c.image_seed is None]
MEDIA_CASES = [c for c in CASES if c.image_seed is not None]


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]) -> Iterator[LoadedModel]:
    model = load_model(str(tiny_models["qwen2-vl"]))
    model.eos_token_ids = frozenset()  # every request runs its whole budget
    yield model


async def run_one(engine: Engine, prompt: PreparedPrompt, case: Case, name: str) -> list[int]:
    seq: Sequence = engine.submit(name, prompt, case.params, case.max_tokens)
    async with asyncio.timeout(TOKEN_TIMEOUT_S):
        return [e.token_id async for e in engine.tokens(seq, TOKEN_TIMEOUT_S) if e.token_id is not None]


async def run_in_turn(engine: Engine, loaded: LoadedModel, cases: list[Case]) -> list[list[int]]:
    engine.start()
    try:
        return [await run_one(engine, prompt_of(loaded, c), c, f"r{i}") for i, c in enumerate(cases)]
    finally:
        await engine.close()


async def test_prefills_after_the_first_run_inline_with_the_same_tokens_and_media_ones_never(
    loaded: LoadedModel,
) -> None:
    cases = [*TEXT_CASES, *MEDIA_CASES, *TEXT_CASES, *MEDIA_CASES]
    reference = await run_in_turn(Engine(loaded, 4, inline_step_budget_s=0.0), loaded, cases)
    engine = Engine(loaded, 4, inline_step_budget_s=float("inf"))
    got = await run_in_turn(engine, loaded, cases)
    assert got == reference
    # The first text prefill ran on the thread to be measured; every other text prefill ran
    # inline, no media prefill did. Every decode step but the first (nothing measured yet) ran
    # inline: the budget is unbounded.
    assert engine.stats.inline_prefills == 2 * len(TEXT_CASES) - 1, engine.stats
    assert engine.prefill_cost.inline_runs == 2 * len(TEXT_CASES) - 1
    on_thread = 1 + 1 + 2 * len(MEDIA_CASES)  # the first text prefill, the first decode, the media prefills
    assert engine.stats.inline_steps == engine.stats.steps - on_thread, engine.stats


async def test_a_prefill_predicted_over_the_budget_runs_on_the_worker_thread(loaded: LoadedModel) -> None:
    case = TEXT_CASES[0]
    # A budget far above any real prefill of a few tokens, however loaded the machine: the test is
    # about the rule (prediction against budget), not about how fast this machine is.
    engine = Engine(loaded, 4, inline_step_budget_s=10.0)
    engine.start()
    try:
        prompt = prompt_of(loaded, case)
        engine.prefill_cost.record(1, 1000.0, inline=False)  # "1000 s per token": not inline
        await run_one(engine, prompt, case, "slow")
        assert engine.stats.inline_prefills == 0, engine.stats
        # The measurement replaced the prediction (a real prefill of a few tokens: far below 10 s).
        predicted = engine.prefill_cost.predict_s(prompt.num_tokens)
        assert predicted is not None and predicted < 10.0
        await run_one(engine, prompt_of(loaded, case), case, "fast")
        assert engine.stats.inline_prefills == 1, engine.stats
    finally:
        await engine.close()


async def test_no_prefill_runs_inline_without_a_budget(loaded: LoadedModel) -> None:
    engine = Engine(loaded, 4, inline_step_budget_s=0.0)
    engine.prefill_cost.record(1000, 1e-9, inline=False)  # predicted free: still not inline
    await run_in_turn(engine, loaded, TEXT_CASES[:2])
    assert engine.stats.inline_steps == 0 and engine.stats.inline_prefills == 0, engine.stats


async def test_the_first_token_of_a_prefill_on_the_thread_is_delivered_before_the_next_step(
    loaded: LoadedModel,
) -> None:
    """A prefill in the worker thread (media) followed by inline decode steps: the stream gets its first
    token before the next step runs, not after it (which cost one decode step of time to first token)."""
    engine = Engine(loaded, 4, inline_step_budget_s=float("inf"))
    engine.start()
    try:
        warm = TEXT_CASES[0]
        await run_one(
            engine, prompt_of(loaded, warm), warm, "warm"
        )  # decode steps measured: later ones inline
        case = MEDIA_CASES[0]
        steps_before = engine.stats.steps
        seq = engine.submit("media", prompt_of(loaded, case), case.params, case.max_tokens)
        seen_at: list[int] = []
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            async for _ in engine.tokens(seq, TOKEN_TIMEOUT_S):
                seen_at.append(engine.stats.steps)
    finally:
        await engine.close()
    assert engine.stats.inline_prefills == 0  # the media prefill ran in the thread
    # Each token is seen before the step after the one that made it starts.
    assert seen_at == list(range(steps_before + 1, steps_before + 1 + case.max_tokens)), seen_at
