"""The flags and environment of an Eric process (`EricDescriptor.launch_spec` writes the command line)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from cornserve.models.media_policy import MediaPolicy
from cornserve.runtime.settings import Flag, ProcessInfo, RequiredSidecarRanks, ServiceSettings


class EricSettings(ServiceSettings, MediaPolicy):
    """Everything the command line and ``CORNSERVE_*`` environment give one Eric process.

    The ``media_*`` fields (`MediaPolicy`) are the media policy: ``--media-dirs``, ``CORNSERVE_MEDIA_DIRS``, ...
    """

    model_config = ServiceSettings.model_config  # the settings' config wins over MediaPolicy's

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "eric", "python -m cornserve.eric", "Eric, Cornserve's encoder server"
    )

    model_id: str = Field(min_length=1)
    """Local checkpoint directory or Hub id."""
    modality: str = Field(min_length=1)
    """The one modality this server encodes (image, video)."""
    max_batch_size: int = Field(default=8, ge=1)
    """Most media items encoded in one forward."""
    max_pending: int = Field(default=256, ge=1)
    """Media items admitted at once (being fetched, queued, encoded or sent); beyond, 429 at once."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """Devices the encoder is sharded over."""
    host: str = "127.0.0.1"
    """Address the HTTP endpoints listen on."""
    port: int = Field(gt=0, lt=65536)
    """Port of the HTTP endpoints."""
    sidecar_ranks: RequiredSidecarRanks
    """Comma-separated sidecar ranks; the first one sends."""
    executor_id: Annotated[str, Flag(env_only=True)] = "eric"
    """This executor's id (the task manager sets it)."""
    media_timeout_s: Annotated[float, Flag(name="--media-timeout")] = Field(default=30.0, gt=0)
    """One deadline for fetching and decoding one media item, slow senders included."""
    preprocess_workers: Annotated[int, Flag(env_only=True)] = Field(default=2, ge=1)
    """Threads preparing media for the encoder."""
    send_timeout_s: Annotated[float, Flag(env_only=True)] = Field(default=60.0, gt=0)
    """Seconds one embedding send through the sidecar may take."""
    drain_timeout_s: Annotated[float, Flag(name="--drain-timeout")] = Field(default=30.0, gt=0)
    """Seconds in-flight requests get on SIGTERM."""

    @property
    def stop_deadline_s(self) -> float:
        """The HTTP drain, then a margin to close the sidecar."""
        return self.drain_timeout_s + 15.0
