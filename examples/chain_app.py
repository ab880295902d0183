"""Chain: a multimodal LLM describes an image, then a second LLM rewrites the description.

Two task graphs in one `serve`: the first (image encoder → LLM) answers with one whole completion
(`LLMCompletionTask`), whose text `serve` reads to build the second request; the second (a
text-only LLM) streams its rewrite. The response streams the description first, then the rewrite
piece by piece:

    graph 1: EncoderTask[image] ──embeddings──► LLMCompletionTask[embeddings] ──► serve reads the text
    graph 2: LLMTask (rewriter) ⇢ streamed to the caller

Set CORNSERVE_CHAIN_DESCRIBER (a multimodal checkpoint) and CORNSERVE_CHAIN_REWRITER (any chat
LLM) to real checkpoint directories or Hub ids to get real answers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, Field

from cornserve.app import AppConfig
from cornserve.task import Task
from cornserve.task.builtins import (
    ChatCompletion,
    ChatCompletionRequest,
    EncoderInput,
    EncoderTask,
    LLMCompletionTask,
    LLMTask,
    Modality,
)

DESCRIBER_MODEL = os.environ.get("CORNSERVE_CHAIN_DESCRIBER", "Qwen/Qwen2-VL-2B-Instruct")
REWRITER_MODEL = os.environ.get("CORNSERVE_CHAIN_REWRITER", "Qwen/Qwen2.5-0.5B-Instruct")
REWRITE_INSTRUCTION = "Rewrite this image description as {style}:\n\n{description}"


class Describe(Task[ChatCompletionRequest, ChatCompletion]):
    """Encoder fission with one whole completion: the image encoder, then the LLM on its embeddings."""

    model_id: str

    def post_init(self) -> None:
        """The encoder and the LLM (each deployed once, shared with other apps of the same model)."""
        self.encoder = EncoderTask(modality=Modality.IMAGE, model_id=self.model_id)
        self.llm = LLMCompletionTask(model_id=self.model_id, receive_embeddings=True)

    def invoke(self, task_input: ChatCompletionRequest) -> ChatCompletion:
        """Encode the images, then answer from their embeddings."""
        media = task_input.check_modalities([Modality.IMAGE], f"Describe({self.model_id})")
        request = task_input.model_copy(update={"model": self.model_id})
        if not media:
            return self.llm.invoke(request)
        encoded = self.encoder.invoke(EncoderInput(model_id=self.model_id, data_urls=[m.url for m in media]))
        return self.llm.invoke(request.model_copy(update={"cornserve_embeddings": list(encoded.embeddings)}))


describe = Describe(model_id=DESCRIBER_MODEL)
rewrite = LLMTask(model_id=REWRITER_MODEL)


class Config(AppConfig):
    tasks = {"describe": describe, "rewrite": rewrite}


class Request(BaseModel):
    image_url: str
    """An `http(s):`, `data:` or `file:` URL of the image."""
    style: str = "a short poem"
    max_completion_tokens: int = Field(default=32, ge=1, le=1024)


class Piece(BaseModel):
    stage: Literal["description", "rewrite"]
    text: str


async def serve(request: Request) -> AsyncIterator[Piece]:
    look = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": request.image_url}},
                        {"type": "text", "text": "Describe this picture."},
                    ],
                }
            ],
            "max_completion_tokens": request.max_completion_tokens,
        }
    )
    described = await describe(look)
    description = "".join(choice.message.content or "" for choice in described.choices)
    yield Piece(stage="description", text=description)
    ask = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": REWRITE_INSTRUCTION.format(style=request.style, description=description),
                }
            ],
            "max_completion_tokens": request.max_completion_tokens,
        }
    )
    async for chunk in await rewrite(ask):
        for choice in chunk.choices:
            if choice.delta.content:
                yield Piece(stage="rewrite", text=choice.delta.content)
