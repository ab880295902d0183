"""An image + text chat app on a multimodal LLM that streams its answer.

The MLLM runs with encoder fission: the image encoder and the LLM are separate unit tasks (each
deployed once and shared with other apps), and the image embeddings travel encoder → LLM through
the sidecar. Point MODEL_ID at a real Hugging Face checkpoint directory (or Hub id) to get real
answers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field

from cornserve.app import AppConfig
from cornserve.task.builtins import ChatCompletionRequest, MLLMTask, Modality

MODEL_ID = os.environ.get("CORNSERVE_DEMO_MODEL", "Qwen/Qwen2-VL-2B-Instruct")

mllm = MLLMTask(model_id=MODEL_ID, modalities=[Modality.IMAGE], encoder_fission=True)


class Config(AppConfig):
    tasks = {"mllm": mllm}


class Request(BaseModel):
    prompt: str = Field(min_length=1, description="The question about the images.")
    image_urls: list[str] = Field(default_factory=list, description="http(s):, data: or file: URLs.")
    max_completion_tokens: int = Field(default=64, ge=1, le=4096)


class Response(BaseModel):
    text: str


async def serve(request: Request) -> AsyncIterator[Response]:
    content: list[dict[str, object]] = [
        {"type": "image_url", "image_url": {"url": url}} for url in request.image_urls
    ]
    content.append({"type": "text", "text": request.prompt})
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": content}],
            "max_completion_tokens": request.max_completion_tokens,
        }
    )
    stream = await mllm(chat)
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                yield Response(text=choice.delta.content)
