"""Short prefills on the event loop (`Engine.prefill_costs`), in process on the tiny checkpoints.

The first prefill of each kind (media the model encodes itself; text or received embeddings) runs
on the worker thread and is measured; later ones run inline when predicted within the budget. The
tokens must not depend on where a prefill ran: the reference is an engine that never runs a step
inline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.llm_executor.test_decode_batching import CASES, Case, prompt_of

from cornserve.llm_executor.engine import Engine, PrefillCosts, Sequence
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


async def test_prefills_after_the_first_of_their_kind_run_inline_with_the_same_tokens(
    loaded: LoadedModel,
) -> None:
    cases = [*TEXT_CASES, *MEDIA_CASES, *TEXT_CASES, *MEDIA_CASES]
    reference = await run_in_turn(Engine(loaded, 4, inline_step_budget_s=0.0), loaded, cases)
    engine = Engine(loaded, 4, inline_step_budget_s=float("inf"))
    got = await run_in_turn(engine, loaded, cases)
    assert got == reference
    # One prefill of each kind ran on the thread to be measured; every other one ran inline.
    assert engine.stats.inline_prefills == len(cases) - 2, engine.stats
    assert engine.prefill_costs.text.inline_runs == 2 * len(TEXT_CASES) - 1
    assert engine.prefill_costs.media.inline_runs == 2 * len(MEDIA_CASES) - 1


async def test_a_prefill_predicted_over_the_budget_runs_on_the_worker_thread(loaded: LoadedModel) -> None:
    case = TEXT_CASES[0]
    engine = Engine(loaded, 4, inline_step_budget_s=0.005)
    engine.start()
    try:
        prompt = prompt_of(loaded, case)
        engine.prefill_costs.text.record(1, 1.0, inline=False)  # "a second per token": never inline
        await run_one(engine, prompt, case, "slow")
        assert engine.stats.inline_prefills == 0, engine.stats
        # The measurement replaced the prediction (a real prefill of a few tokens takes milliseconds).
        predicted = engine.prefill_costs.text.predict_s(prompt.num_tokens)
        assert predicted is not None and predicted < 0.005
        await run_one(engine, prompt_of(loaded, case), case, "fast")
        assert engine.stats.inline_prefills == 1, engine.stats
        # A prompt with media the model encodes is another kind: its first prefill is measured on the thread.
        media = MEDIA_CASES[0]
        await run_one(engine, prompt_of(loaded, media), media, "media")
        assert engine.stats.inline_prefills == 1, engine.stats
    finally:
        await engine.close()


async def test_no_prefill_runs_inline_without_a_budget(loaded: LoadedModel) -> None:
    engine = Engine(loaded, 4, inline_step_budget_s=0.0)
    engine.prefill_costs.text.record(1000, 1e-9, inline=False)  # predicted free: still not inline
    await run_in_turn(engine, loaded, TEXT_CASES[:2])
    assert engine.stats.inline_steps == 0 and engine.stats.inline_prefills == 0, engine.stats


def test_prefill_costs_predict_each_kind_apart(loaded: LoadedModel) -> None:
    costs = PrefillCosts(0.005)
    text = prompt_of(loaded, TEXT_CASES[0])
    media = prompt_of(loaded, MEDIA_CASES[0])
    assert costs.of(text) is costs.text and costs.of(media) is costs.media
    assert costs.predict_s([text]) is None
    costs.text.record(10, 0.001, inline=False)
    assert costs.predict_s([text]) == pytest.approx(0.0001 * text.num_tokens)
    assert costs.predict_s([text, media]) is None  # the media kind was never measured
    costs.media.record(10, 0.01, inline=False)
    assert costs.predict_s([text, media]) == pytest.approx(
        0.0001 * text.num_tokens + 0.001 * media.num_tokens
    )
