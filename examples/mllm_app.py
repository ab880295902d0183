"""An image + text chat app on a multimodal LLM that speaks OpenAI chat completions.

Its request is an OpenAI chat-completions request and it streams `chat.completion.chunk`s, the last
one with the token usage. Because its config sets `openai_chat`, the gateway serves it both at its
own route (`POST /apps/<name>/invoke`, the chunks as NDJSON) and at `POST /v1/chat/completions`
with `model` set to the app's name (any OpenAI client: streamed, or as one completion).

The MLLM runs with encoder fission: the image encoder and the LLM are separate unit tasks (each
deployed once and shared with other apps), and the image embeddings travel encoder → LLM through
the sidecar. Point MODEL_ID at a real Hugging Face checkpoint directory (or Hub id) to get real
answers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from cornserve.app import AppConfig
from cornserve.task.builtins import ChatCompletionChunk, ChatCompletionRequest, MLLMTask, Modality

MODEL_ID = os.environ.get("CORNSERVE_DEMO_MODEL", "Qwen/Qwen2-VL-2B-Instruct")
DEFAULT_MAX_TOKENS = 64
"""The answer's length when the request sets neither `max_completion_tokens` nor `max_tokens`."""

mllm = MLLMTask(model_id=MODEL_ID, modalities=[Modality.IMAGE], encoder_fission=True)


class Config(AppConfig):
    tasks = {"mllm": mllm}
    openai_chat = True


async def serve(request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:
    if request.max_completion_tokens is None and request.max_tokens is None:
        request = request.model_copy(update={"max_completion_tokens": DEFAULT_MAX_TOKENS})
    async for chunk in await mllm(request):
        yield chunk
