"""The engine's waiting queue is bounded (`--max-waiting`): a full queue refuses with 429, in process.

A real tiny model generates, so the admitted sequences are shown to finish and the queue to take
new work again once it drains.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cornserve.llm_executor.engine import Engine, Sequence
from cornserve.llm_executor.errors import ExecutorOverloaded
from cornserve.llm_executor.model import LoadedModel, load_model
from cornserve.llm_executor.prompt import PreparedPrompt, prepare_with_media
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.llm_executor.server import error_response
from cornserve.task.builtins.chat import ChatCompletionRequest

TOKEN_TIMEOUT_S = 120.0
MAX_TOKENS = 4


def prompt(loaded: LoadedModel, text: str) -> PreparedPrompt:
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": text}]})
    return prepare_with_media(loaded, request, [])


async def tokens(engine: Engine, seq: Sequence) -> list[int]:
    return [e.token_id async for e in engine.tokens(seq, TOKEN_TIMEOUT_S) if e.token_id is not None]


async def test_a_full_waiting_queue_refuses_with_429_and_admitted_sequences_finish(
    tiny_models: dict[str, Path],
) -> None:
    loaded = load_model(str(tiny_models["qwen2-vl"]))
    loaded.eos_token_ids = frozenset()  # every sequence runs its whole budget
    engine = Engine(loaded, 1, max_waiting=1)  # one running, one waiting
    params = SamplingParams()
    running = engine.submit("a", prompt(loaded, "first"), params, MAX_TOKENS)  # takes the free batch slot
    waiting = engine.submit("b", prompt(loaded, "second"), params, MAX_TOKENS)
    with pytest.raises(ExecutorOverloaded, match=r"the limit is 1 \(--max-waiting\)") as refused:
        engine.submit("c", prompt(loaded, "third"), params, MAX_TOKENS)
    response = error_response(refused.value)
    assert (response.status, response.headers["Retry-After"]) == (429, "1")
    assert engine.stats.waiting == 2  # the refused one was never queued

    engine.start()
    try:
        async with asyncio.timeout(TOKEN_TIMEOUT_S):
            done = await asyncio.gather(tokens(engine, running), tokens(engine, waiting))
            assert [len(t) for t in done] == [MAX_TOKENS, MAX_TOKENS]
            again = engine.submit("d", prompt(loaded, "fourth"), params, MAX_TOKENS)  # drained: room again
            assert len(await tokens(engine, again)) == MAX_TOKENS
    finally:
        await engine.close()
