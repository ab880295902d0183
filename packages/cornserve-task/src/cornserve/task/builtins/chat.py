"""OpenAI chat-completions wire types, as used by LLM and MLLM tasks.

Requests accept what OpenAI's API and vLLM's extensions accept (text, image_url, video_url,
audio_url and input_audio content parts); unknown top-level fields are kept and passed on to the
executor. Chunks follow OpenAI's `chat.completion.chunk` format.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cornserve.task.builtins.modality import Modality
from cornserve.task.errors import InvalidTaskInputError
from cornserve.task.forward import DataForward, Tensor
from cornserve.task.io_models import TaskInput, TaskOutput


class TextPart(BaseModel):
    """A text content part."""

    type: Literal["text"] = "text"
    text: str


class MediaURL(BaseModel):
    """A URL of a media item: `http(s):`, `data:` or `file:`."""

    url: str
    detail: str | None = None


class ImageURLPart(BaseModel):
    """An image content part."""

    type: Literal["image_url"] = "image_url"
    image_url: MediaURL


class VideoURLPart(BaseModel):
    """A video content part (vLLM extension)."""

    type: Literal["video_url"] = "video_url"
    video_url: MediaURL


class AudioURLPart(BaseModel):
    """An audio content part given by URL (vLLM extension)."""

    type: Literal["audio_url"] = "audio_url"
    audio_url: MediaURL


class InputAudio(BaseModel):
    """Base64 audio data with its format, as OpenAI sends it."""

    data: str
    format: str = "wav"


class InputAudioPart(BaseModel):
    """An audio content part with inline base64 data (OpenAI)."""

    type: Literal["input_audio"] = "input_audio"
    input_audio: InputAudio


ContentPart = Annotated[
    TextPart | ImageURLPart | VideoURLPart | AudioURLPart | InputAudioPart, Field(discriminator="type")
]


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class MediaItem(BaseModel):
    """A media item found in a request, in order of appearance."""

    modality: Modality
    url: str
    message_index: int
    part_index: int


def _part_media(part: Any) -> tuple[Modality, str] | None:
    if isinstance(part, ImageURLPart):
        return Modality.IMAGE, part.image_url.url
    if isinstance(part, VideoURLPart):
        return Modality.VIDEO, part.video_url.url
    if isinstance(part, AudioURLPart):
        return Modality.AUDIO, part.audio_url.url
    if isinstance(part, InputAudioPart):
        return Modality.AUDIO, f"data:audio/{part.input_audio.format};base64,{part.input_audio.data}"
    return None


class ChatCompletionRequest(TaskInput):
    """An OpenAI chat-completions request, plus the embedding forwards of an encoder-fission LLM."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    cornserve_embeddings: list[DataForward[Tensor]] = Field(
        default_factory=list,
        description="Embeddings of the request's media, in order of appearance (encoder fission).",
    )

    def media(self) -> list[MediaItem]:
        """The request's media items in the order they appear in the messages."""
        items: list[MediaItem] = []
        for m_index, message in enumerate(self.messages):
            if not isinstance(message.content, list):
                continue
            for p_index, part in enumerate(message.content):
                found = _part_media(part)
                if found is not None:
                    items.append(
                        MediaItem(modality=found[0], url=found[1], message_index=m_index, part_index=p_index)
                    )
        return items

    def check_modalities(self, declared: Collection[Modality], task: str) -> list[MediaItem]:
        """The request's media, each checked against the modalities `task` (e.g. `LLMTask(qwen)`) declares."""
        media = self.media()
        for item in media:
            if item.modality not in declared:
                names = ", ".join(m.value for m in declared) or "none"
                raise InvalidTaskInputError(
                    f"{item.modality.value} content (message {item.message_index}, part {item.part_index}) is not "
                    f"accepted: {task} declares modalities [{names}]"
                )
        return media

    def check_media_inputs(self, task: str, receive_embeddings: bool, declared: Collection[Modality]) -> None:
        """Media arrive the way `task` (e.g. `LLMTask(qwen)`) is configured to take them.

        With `receive_embeddings`, one embedding forward per media item (an encoder ran first);
        without, none, and every item of a modality `task` declares.
        """
        media = self.media()
        forwards = self.cornserve_embeddings
        if receive_embeddings:
            if len(forwards) != len(media):
                raise InvalidTaskInputError(
                    f"{task} receives embeddings: the request has {len(media)} media item(s) "
                    f"but {len(forwards)} embedding forward(s)"
                )
            return
        if forwards:
            raise InvalidTaskInputError(
                f"{task} was given embedding forwards but has receive_embeddings=False"
            )
        self.check_modalities(declared, task)

    def openai_body(self) -> dict[str, Any]:
        """The request as OpenAI JSON, without Cornserve's own fields."""
        return self.model_dump(mode="json", exclude={"cornserve_embeddings"}, exclude_unset=True)


class ChoiceDelta(BaseModel):
    """The increment of one choice in a chunk."""

    model_config = ConfigDict(extra="allow")

    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """One choice in a chunk."""

    model_config = ConfigDict(extra="allow")

    index: int = 0
    delta: ChoiceDelta = Field(default_factory=ChoiceDelta)
    finish_reason: str | None = None


class Usage(BaseModel):
    """Token counts of a completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionChunk(TaskOutput):
    """One streamed chunk of a chat completion (OpenAI `chat.completion.chunk`)."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None


class CompletionMessage(BaseModel):
    """The message of a non-streamed completion's choice."""

    model_config = ConfigDict(extra="allow")

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class CompletionChoice(BaseModel):
    """One choice of a non-streamed completion."""

    model_config = ConfigDict(extra="allow")

    index: int = 0
    message: CompletionMessage = Field(default_factory=CompletionMessage)
    finish_reason: str | None = None


class ChatCompletion(TaskOutput):
    """A whole chat completion (OpenAI `chat.completion`): what a non-streamed request answers."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None

    @classmethod
    def from_chunks(cls, chunks: list[ChatCompletionChunk]) -> ChatCompletion:
        """The completion a stream of chunks adds up to (ValueError on an empty stream).

        Each choice's text is joined, with its last finish reason; the usage is the last one a chunk carried.
        """
        if not chunks:
            raise ValueError("a completion needs at least one chunk")
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage: Usage | None = None
        for chunk in chunks:
            for choice in chunk.choices:
                texts.setdefault(choice.index, [])
                if choice.delta.content:
                    texts[choice.index].append(choice.delta.content)
                if choice.finish_reason is not None:
                    finish[choice.index] = choice.finish_reason
            usage = chunk.usage or usage
        first = chunks[0]
        return cls(
            id=first.id,
            created=first.created,
            model=first.model,
            choices=[
                CompletionChoice(
                    index=index,
                    message=CompletionMessage(content="".join(parts)),
                    finish_reason=finish.get(index),
                )
                for index, parts in sorted(texts.items())
            ],
            usage=usage,
        )

    def to_chunks(self) -> list[ChatCompletionChunk]:
        """The completion as a stream: per choice its role, its text and its finish, then the usage."""
        chunks = []
        for choice in self.choices:
            delta = ChoiceDelta(role="assistant", content=choice.message.content or "")
            chunks.append(self._chunk([ChunkChoice(index=choice.index, delta=delta)]))
            chunks.append(self._chunk([ChunkChoice(index=choice.index, finish_reason=choice.finish_reason)]))
        if self.usage is not None:
            chunks.append(self._chunk([], self.usage))
        return chunks

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
