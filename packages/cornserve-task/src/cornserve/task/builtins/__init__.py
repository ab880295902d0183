"""Built-in tasks: encoders, LLMs and multimodal LLMs, with their execution descriptors."""

from cornserve.task.builtins.chat import (
    AudioURLPart,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceDelta,
    ChunkChoice,
    ImageURLPart,
    InputAudioPart,
    MediaItem,
    MediaURL,
    TextPart,
    Usage,
    VideoURLPart,
)
from cornserve.task.builtins.encoder import EncoderInput, EncoderOutput, EncoderTask, EricDescriptor
from cornserve.task.builtins.llm import CPULLMDescriptor, LLMTask, OpenAIChatDescriptor, VLLMDescriptor
from cornserve.task.builtins.mllm import MLLMTask
from cornserve.task.builtins.modality import Modality

__all__ = [
    "AudioURLPart",
    "CPULLMDescriptor",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChoiceDelta",
    "ChunkChoice",
    "EncoderInput",
    "EncoderOutput",
    "EncoderTask",
    "EricDescriptor",
    "ImageURLPart",
    "InputAudioPart",
    "LLMTask",
    "MLLMTask",
    "MediaItem",
    "MediaURL",
    "Modality",
    "OpenAIChatDescriptor",
    "TextPart",
    "Usage",
    "VLLMDescriptor",
    "VideoURLPart",
]
