"""Thinker-Talker: a thinker LLM whose per-token hidden states stream to a talker that generates from them.

The graph is two unit tasks joined by one stream forward (`ThinkerTalkerTask`):

    ThinkerTask ──(last-layer hidden state of each generated token, chunk by chunk through the
                   sidecar)──▶ TalkerTask ──▶ the talker's tokens, streamed to the caller

The talker makes one token per hidden state, starting on the first one, so its first token exists
before the thinker has finished. Each response item is one talker token with how many hidden
states the talker had read when it made it.

Both run on the CPU LLM executor. Try it with tiny random checkpoints (meaningless tokens):

    cornserve models tiny qwen2-thinker /tmp/thinker
    cornserve models tiny qwen2-talker /tmp/talker
    CORNSERVE_THINKER_MODEL=/tmp/thinker CORNSERVE_TALKER_MODEL=/tmp/talker cornserve up --cpu-slots 2 ...
    cornserve register examples/thinker_talker_app.py --name thinker-talker
    cornserve invoke thinker-talker '{"prompt": "Describe a cat."}'

(the variables must be in the environment of `cornserve up`: the gateway reads this file).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from cornserve.app import AppConfig
from cornserve.task.builtins import ChatCompletionRequest, ThinkerTalkerTask

THINKER_MODEL = os.environ.get("CORNSERVE_THINKER_MODEL", "/models/qwen2-thinker")
TALKER_MODEL = os.environ.get("CORNSERVE_TALKER_MODEL", "/models/qwen2-talker")

pair = ThinkerTalkerTask(thinker_model_id=THINKER_MODEL, talker_model_id=TALKER_MODEL, talker_max_tokens=256)


class Config(AppConfig):
    tasks = {"thinker_talker": pair}


class Request(BaseModel):
    prompt: str
    max_tokens: int = Field(default=32, ge=1, le=256)
    """The thinker's answer length in tokens (the talker makes at most one token per thinker token)."""


class Response(BaseModel):
    index: int
    token_id: int | None
    text: str
    finish_reason: str | None
    inputs_received: int
    inputs_complete: bool


async def serve(request: Request) -> AsyncIterator[Response]:
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": request.prompt}],
            "max_completion_tokens": request.max_tokens,
            "temperature": 0,
        }
    )
    async for chunk in await pair(chat):
        yield Response.model_validate(chunk.model_dump())
