"""Settings of the LLM executor: exactly the flags `CPULLMDescriptor.launch_spec` passes, plus tuning knobs."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from cornserve.models.media_policy import MediaPolicy
from cornserve.runtime.settings import Flag, OnOff, ProcessInfo, ServiceSettings, SidecarRanks


class LLMExecutorSettings(ServiceSettings, MediaPolicy):
    """Everything the executor process is configured with (flags plus ``CORNSERVE_*`` environment).

    The ``media_*`` fields (`MediaPolicy`) are the media policy: ``--media-dirs``, ``CORNSERVE_MEDIA_DIRS``, ...
    """

    model_config = ServiceSettings.model_config  # the settings' config wins over MediaPolicy's

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "llm-executor",
        "python -m cornserve.llm_executor",
        ("Cornserve's CPU LLM executor: an OpenAI-compatible chat server on transformers."),
    )

    model_id: str = Field(min_length=1)
    """Local Hugging Face-layout directory or Hub id."""
    host: str = "127.0.0.1"
    """Address the HTTP endpoints listen on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port of the HTTP endpoints."""
    max_batch_size: int = Field(default=8, ge=1)
    """Most sequences decoded per step."""
    max_waiting: int = Field(default=256, ge=0)
    """Sequences queued for a batch slot (beyond the max_batch_size active); more are refused with 429."""
    decode_batching: OnOff = True
    """Decode all active sequences in one forward per step (off: one forward per sequence)."""
    sidecar_ranks: SidecarRanks = Field(default_factory=list)
    """Comma-separated sidecar ranks."""
    receive_embeddings: bool = False
    """Encoder fission: media arrive as embedding forwards through the sidecar."""
    forward_hidden_states: bool = False
    """Thinker role: a chat request may ask for its tokens' last-layer hidden states to be sent through the sidecar."""
    receive_input_embeds: bool = False
    """Talker role: serve `POST /v1/generate_from_embeds` (generation from embeddings streamed through the sidecar)."""
    max_model_len: int | None = Field(default=None, ge=1)
    """Context limit (default: the model's)."""
    default_max_tokens: int = Field(default=256, ge=1)
    """Completion cap when a request sets none."""
    embedding_timeout_s: float = Field(default=60.0, gt=0)
    """Deadline per embedding forward."""
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    """Where the model runs: cpu, cuda or cuda:N (of the devices CUDA_VISIBLE_DEVICES leaves visible)."""
    executor_id: Annotated[str, Flag(env_only=True)] = "llm-executor"
    """This executor's id (the task manager sets it)."""

    @model_validator(mode="after")
    def _fission_needs_a_sidecar(self) -> LLMExecutorSettings:
        if self.receive_embeddings and not self.sidecar_ranks:
            raise ValueError(
                "--receive-embeddings needs --sidecar-ranks (the sidecar to receive embeddings on)"
            )
        if self.forward_hidden_states and not self.sidecar_ranks:
            raise ValueError("--forward-hidden-states needs --sidecar-ranks (the sidecar to send them from)")
        if self.receive_input_embeds and not self.sidecar_ranks:
            raise ValueError("--receive-input-embeds needs --sidecar-ranks (the sidecar to receive them on)")
        return self

    @property
    def uses_sidecar(self) -> bool:
        """Whether any role needs this executor's sidecar client."""
        return self.receive_embeddings or self.forward_hidden_states or self.receive_input_embeds
