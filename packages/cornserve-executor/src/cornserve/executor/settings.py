"""The flags and environment of a Python task executor process (written by PythonExecutorDescriptor)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field

from cornserve.bus.invoke_channel import DEFAULT_MAX_FRAME_BYTES, MIN_MAX_FRAME_BYTES
from cornserve.runtime.settings import Flag, ProcessInfo, ServiceSettings, SidecarRanks


def _json_object(value: object) -> object:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
    return value


class PythonExecutorSettings(ServiceSettings):
    """Everything the command line and ``CORNSERVE_*`` environment give one executor process."""

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "executor", "python -m cornserve.executor", "Cornserve Python task executor"
    )

    task: Annotated[dict[str, Any], Flag(name="--task-json"), BeforeValidator(_json_object)]
    """The unit task, as serialize_task() JSON."""
    executor_id: str = Field(min_length=1)
    """This executor's id (the task manager's name for it)."""
    host: str = "127.0.0.1"
    """Address the HTTP endpoints listen on."""
    port: int = Field(gt=0, lt=65536)
    """Port of the HTTP endpoints."""
    channel_port: int | None = Field(default=None, gt=0, lt=65536)
    """Port of the invocation channel (`cornserve.executor.channel`) on `host`; unset: HTTP only."""
    channel_max_frame_bytes: int = Field(default=DEFAULT_MAX_FRAME_BYTES, ge=MIN_MAX_FRAME_BYTES)
    """Largest frame the invocation channel reads; a bigger one closes its connection."""
    sidecar_ranks: SidecarRanks = Field(default_factory=list)
    """Comma-separated sidecar ranks; the first one is used."""
    startup_timeout_s: Annotated[float, Flag(name="--startup-timeout")] = Field(default=120.0, gt=0)
    """Seconds to become ready."""
    library_wait_s: Annotated[float, Flag(name="--library-wait")] = Field(default=10.0, gt=0)
    """Seconds to wait for the task's library to appear."""
    max_in_flight: int = Field(default=256, ge=1)
    """Invocations running at once; more are refused with 429 and Retry-After at once."""
    drain_timeout_s: Annotated[float, Flag(name="--drain-timeout")] = Field(default=30.0, gt=0)
    """Seconds in-flight requests get on SIGTERM."""

    @property
    def stop_deadline_s(self) -> float:
        """The HTTP drain, then a margin to close the sidecar and NATS."""
        return self.drain_timeout_s + 15.0
