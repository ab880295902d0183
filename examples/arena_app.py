"""Arena: one image, one encoder, several LLMs answering the same question side by side.

The image is encoded once per request by one `EncoderTask`; its embeddings are broadcast through
the sidecars to every LLM of the arena (one forward, one destination group per LLM), and the LLMs
answer in parallel, each with one whole completion (`LLMCompletionTask`). All of it is one task
graph:

    EncoderTask[image] ──embeddings──► LLMCompletionTask (model 1)
                       └─embeddings──► LLMCompletionTask (model 2) ...

The LLMs must take the encoder's embeddings: checkpoints of one family sharing its vision tower
(e.g. fine-tunes of one base model). Set CORNSERVE_ARENA_ENCODER and CORNSERVE_ARENA_MODELS
(comma-separated) to real checkpoint directories or Hub ids to get real answers.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from cornserve.app import AppConfig
from cornserve.task import Task, TaskOutput
from cornserve.task.builtins import (
    ChatCompletion,
    ChatCompletionRequest,
    EncoderInput,
    EncoderTask,
    LLMCompletionTask,
    Modality,
)

ENCODER_MODEL = os.environ.get("CORNSERVE_ARENA_ENCODER", "Qwen/Qwen2-VL-2B-Instruct")
LLM_MODELS = os.environ.get(
    "CORNSERVE_ARENA_MODELS", "Qwen/Qwen2-VL-2B-Instruct,Qwen/Qwen2-VL-2B-Instruct-AWQ"
).split(",")


class ArenaAnswers(TaskOutput):
    """One completion per LLM, in the arena's order."""

    answers: list[ChatCompletion]


class Arena(Task[ChatCompletionRequest, ArenaAnswers]):
    """One shared image encoder feeding several LLMs that answer in parallel."""

    encoder_model: str
    llm_models: list[str] = Field(min_length=1)

    def post_init(self) -> None:
        """The encoder, and one LLM per model (each deployed once, shared with other apps)."""
        self.encoder = EncoderTask(modality=Modality.IMAGE, model_id=self.encoder_model)
        self.llms = [LLMCompletionTask(model_id=m, receive_embeddings=True) for m in self.llm_models]

    def invoke(self, task_input: ChatCompletionRequest) -> ArenaAnswers:
        """Encode the images once; every LLM takes the same embedding forwards."""
        media = task_input.check_modalities([Modality.IMAGE], "the arena")
        embeddings = []
        if media:
            encoded = self.encoder.invoke(
                EncoderInput(model_id=self.encoder_model, data_urls=[item.url for item in media])
            )
            embeddings = list(encoded.embeddings)
        answers = [
            llm.invoke(
                task_input.model_copy(update={"model": llm.model_id, "cornserve_embeddings": embeddings})
            )
            for llm in self.llms
        ]
        return ArenaAnswers(answers=answers)


arena = Arena(encoder_model=ENCODER_MODEL, llm_models=LLM_MODELS)


class Config(AppConfig):
    tasks = {"arena": arena}


class Request(BaseModel):
    image_url: str
    """An `http(s):`, `data:` or `file:` URL of the image."""
    prompt: str = "What is in this picture?"
    max_completion_tokens: int = Field(default=32, ge=1, le=1024)


class Answer(BaseModel):
    model: str
    text: str
    completion_tokens: int | None = None


class Response(BaseModel):
    answers: list[Answer]
    """Side by side: one per LLM, in the arena's order."""


async def serve(request: Request) -> Response:
    chat = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": request.image_url}},
                        {"type": "text", "text": request.prompt},
                    ],
                }
            ],
            "max_completion_tokens": request.max_completion_tokens,
        }
    )
    result = await arena(chat)
    return Response(
        answers=[
            Answer(
                model=model,
                text="".join(choice.message.content or "" for choice in completion.choices),
                completion_tokens=completion.usage.completion_tokens if completion.usage else None,
            )
            for model, completion in zip(arena.llm_models, result.answers, strict=True)
        ]
    )
