"""App sources of the MLLM end-to-end tests (formatted with model paths at test time)."""

from __future__ import annotations

# What both apps share: the request/response models and a `serve` that streams `mllm`'s text.
_SERVE_MLLM = """

class Config(AppConfig):
    tasks = {{"mllm": mllm}}


class Request(BaseModel):
    messages: list[dict]
    max_completion_tokens: int = 12


class Response(BaseModel):
    text: str


async def serve(request: Request) -> AsyncIterator[Response]:
    chat = ChatCompletionRequest.model_validate(
        {{"messages": request.messages, "max_completion_tokens": request.max_completion_tokens}}
    )
    async for chunk in await mllm(chat):
        for choice in chunk.choices:
            if choice.delta.content:
                yield Response(text=choice.delta.content)
"""

MLLM_APP = (
    """
from collections.abc import AsyncIterator

from pydantic import BaseModel

from cornserve.app import AppConfig
from cornserve.task.builtins import ChatCompletionRequest, MLLMTask, Modality

mllm = MLLMTask(model_id={model!r}, modalities=[Modality.IMAGE], encoder_fission={fission!r})
"""
    + _SERVE_MLLM
)

# Another LLM over the same image encoder: one composite task, so the embeddings stay in one graph
# (encoder → LLM through the sidecar); the encoder (same model id, same config) is shared.
SHARED_ENCODER_APP = (
    """
from collections.abc import AsyncIterator

from pydantic import BaseModel

from cornserve.app import AppConfig
from cornserve.task import Task
from cornserve.task.builtins import (
    ChatCompletionChunk, ChatCompletionRequest, EncoderInput, EncoderTask, LLMTask, Modality,
)
from cornserve.task.stream import Stream


class EncoderThenLLM(Task[ChatCompletionRequest, Stream[ChatCompletionChunk]]):
    encoder_model: str
    llm_model: str

    def post_init(self) -> None:
        self.encoder = EncoderTask(modality=Modality.IMAGE, model_id=self.encoder_model)
        self.llm = LLMTask(model_id=self.llm_model, receive_embeddings=True)

    def invoke(self, request: ChatCompletionRequest) -> Stream[ChatCompletionChunk]:
        urls = [item.url for item in request.media()]
        encoded = self.encoder.invoke(EncoderInput(model_id=self.encoder_model, data_urls=urls))
        return self.llm.invoke(
            request.model_copy(update={{"model": self.llm_model, "cornserve_embeddings": list(encoded.embeddings)}})
        )


mllm = EncoderThenLLM(encoder_model={encoder_model!r}, llm_model={llm_model!r})
"""
    + _SERVE_MLLM
)
