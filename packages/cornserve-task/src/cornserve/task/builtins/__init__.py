"""Built-in tasks: encoders, LLMs and multimodal LLMs, with their execution descriptors."""

from cornserve.task.builtins.chat import (
    AudioURLPart,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceDelta,
    ChunkChoice,
    CompletionChoice,
    CompletionMessage,
    ImageURLPart,
    InputAudioPart,
    MediaItem,
    MediaURL,
    TextPart,
    Usage,
    VideoURLPart,
)
from cornserve.task.builtins.embedding import (
    EMBEDDING_META_CHUNK,
    EMBEDDING_NUM_CHUNKS,
    EMBEDDING_TENSOR_CHUNK,
    EmbeddingMeta,
)
from cornserve.task.builtins.encoder import EncoderInput, EncoderOutput, EncoderTask, EricDescriptor
from cornserve.task.builtins.llm import (
    CPULLMDescriptor,
    LLMCompletionTask,
    LLMTask,
    OpenAIChatDescriptor,
    VLLMDescriptor,
)
from cornserve.task.builtins.mllm import MLLMTask
from cornserve.task.builtins.modality import Modality
from cornserve.task.builtins.thinker_talker import (
    CPUTalkerDescriptor,
    CPUThinkerDescriptor,
    EmbedsGenerationRequest,
    HiddenStatesTarget,
    TalkerChunk,
    TalkerInput,
    TalkerTask,
    ThinkerOutput,
    ThinkerTalkerTask,
    ThinkerTask,
)
from cornserve.task.registry import DESCRIPTORS, UNIT_TASKS, ClassKey


def register_builtins() -> list[ClassKey]:
    """Register the built-in unit tasks and descriptors; returns their keys. Idempotent.

    Defining a task class registers it already; this names the built-ins in one place so that
    registering them is an explicit step (`cornserve.task` calls it on import) rather than a side
    effect a registry lookup triggers.
    """
    tasks = [UNIT_TASKS.register(cls) for cls in (EncoderTask, LLMTask, LLMCompletionTask)]
    descriptors = [DESCRIPTORS.register(cls) for cls in (EricDescriptor, VLLMDescriptor, CPULLMDescriptor)]
    tasks += [UNIT_TASKS.register(cls) for cls in (ThinkerTask, TalkerTask)]
    descriptors += [DESCRIPTORS.register(cls) for cls in (CPUThinkerDescriptor, CPUTalkerDescriptor)]
    return tasks + descriptors


__all__ = [
    "EMBEDDING_META_CHUNK",
    "EMBEDDING_NUM_CHUNKS",
    "EMBEDDING_TENSOR_CHUNK",
    "AudioURLPart",
    "CPULLMDescriptor",
    "CPUTalkerDescriptor",
    "CPUThinkerDescriptor",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChoiceDelta",
    "ChunkChoice",
    "CompletionChoice",
    "CompletionMessage",
    "EmbeddingMeta",
    "EmbedsGenerationRequest",
    "EncoderInput",
    "EncoderOutput",
    "EncoderTask",
    "EricDescriptor",
    "HiddenStatesTarget",
    "ImageURLPart",
    "InputAudioPart",
    "LLMCompletionTask",
    "LLMTask",
    "MLLMTask",
    "MediaItem",
    "MediaURL",
    "Modality",
    "OpenAIChatDescriptor",
    "TalkerChunk",
    "TalkerInput",
    "TalkerTask",
    "TextPart",
    "ThinkerOutput",
    "ThinkerTalkerTask",
    "ThinkerTask",
    "Usage",
    "VLLMDescriptor",
    "VideoURLPart",
    "register_builtins",
]
