"""MLLMTask: a multimodal LLM as a composite of per-modality encoders and an LLM."""

from __future__ import annotations

from pydantic import Field, SerializeAsAny, field_validator

from cornserve.task.base import Task
from cornserve.task.builtins.chat import ChatCompletionChunk, ChatCompletionRequest
from cornserve.task.builtins.encoder import EncoderInput, EncoderTask
from cornserve.task.builtins.llm import LLMTask
from cornserve.task.builtins.modality import Modality
from cornserve.task.descriptor import TaskExecutionDescriptor
from cornserve.task.executor_flags import ModelId
from cornserve.task.forward import DataForward, Tensor
from cornserve.task.placement import NodePlacement
from cornserve.task.stream import Stream


class MLLMTask(Task[ChatCompletionRequest, Stream[ChatCompletionChunk]]):
    """A multimodal LLM.

    With `encoder_fission=True` (default) each media modality gets its own EncoderTask, deployed and
    shared separately, and the LLM receives the embeddings in the order the media appear in the
    messages. With `encoder_fission=False` a single LLMTask encodes the media itself.
    """

    model_id: ModelId
    modalities: list[Modality] = Field(default_factory=lambda: [Modality.IMAGE])
    encoder_fission: bool = True
    max_batch_size: int = Field(default=8, ge=1)
    encoder_descriptor: SerializeAsAny[TaskExecutionDescriptor] | None = None  # type: ignore[type-arg]
    llm_descriptor: SerializeAsAny[TaskExecutionDescriptor] | None = None  # type: ignore[type-arg]
    encoder_placement: NodePlacement | None = Field(default=None, exclude_if=lambda value: value is None)
    """Nodes the encoders may run on (default: any), e.g. the node with the GPU that fits them."""
    llm_placement: NodePlacement | None = Field(default=None, exclude_if=lambda value: value is None)
    """Nodes the LLM may run on (default: any)."""

    @field_validator("modalities")
    @classmethod
    def _media_modalities(cls, modalities: list[Modality]) -> list[Modality]:
        return list(dict.fromkeys(m for m in modalities if m != Modality.TEXT))

    def post_init(self) -> None:
        """Create the encoders (fission) and the LLM."""
        if self.encoder_fission:
            self.encoders = {
                m: EncoderTask(
                    modality=m, model_id=self.model_id, max_batch_size=self.max_batch_size,
                    descriptor=self.encoder_descriptor, placement=self.encoder_placement,
                )
                for m in self.modalities
            }  # fmt: skip
            self.llm = LLMTask(
                model_id=self.model_id, receive_embeddings=True, descriptor=self.llm_descriptor,
                placement=self.llm_placement,
            )  # fmt: skip
        else:
            self.llm = LLMTask(
                model_id=self.model_id, receive_embeddings=False, modalities=self.modalities,
                descriptor=self.llm_descriptor, placement=self.llm_placement,
            )  # fmt: skip

    def invoke(self, task_input: ChatCompletionRequest) -> Stream[ChatCompletionChunk]:
        """Encode each modality's media in one batch, then generate from the ordered embeddings."""
        media = task_input.check_modalities(self.modalities, f"this MLLMTask ({self.model_id})")
        request = task_input.model_copy(update={"model": self.model_id})
        if not self.encoder_fission or not media:
            return self.llm.invoke(request)
        by_modality: dict[Modality, list[str]] = {}
        for item in media:
            by_modality.setdefault(item.modality, []).append(item.url)
        embeddings: dict[Modality, list[DataForward[Tensor]]] = {}
        for modality, urls in by_modality.items():
            encoded = self.encoders[modality].invoke(EncoderInput(model_id=self.model_id, data_urls=urls))
            embeddings[modality] = list(encoded.embeddings)
        ordered = [embeddings[item.modality].pop(0) for item in media]
        return self.llm.invoke(request.model_copy(update={"cornserve_embeddings": ordered}))
