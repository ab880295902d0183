"""Execution descriptors: the strategy that says how a unit task runs on an executor.

A descriptor is configuration (a pydantic model) plus behaviour: how many devices the executor
needs, the command line that launches it, and how one `TaskInvocation` becomes an HTTP request to
the executor and its (possibly streamed) response becomes the task's output.
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cornserve.task.errors import TaskDefinitionError
from cornserve.task.generics import generic_args, is_concrete, is_unbound
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskOutput
from cornserve.task.registry import DESCRIPTORS

if TYPE_CHECKING:
    from cornserve.task.base import UnitTask

TaskT = TypeVar("TaskT", bound="UnitTask[Any, Any]")


class Device(BaseModel):
    """One device given to an executor: a GPU, or a CPU slot on machines without GPUs."""

    kind: Literal["cuda", "cpu"]
    index: int = Field(ge=0)


class ExecutorPlacement(BaseModel):
    """Where one executor runs: its id, address, devices and sidecar ranks, as the task manager decided.

    The input of `TaskExecutionDescriptor.launch_spec` (not to be confused with the
    `ExecutorContext` a Python executor's handler receives per invocation).
    """

    executor_id: str
    host: str = "127.0.0.1"
    port: int = Field(gt=0, lt=65536)
    devices: list[Device]
    sidecar_ranks: list[int]
    nats_url: str | None = None
    channel_port: int | None = Field(default=None, gt=0, lt=65536)
    """A second free port for an invocation channel (`cornserve.bus.invoke_channel`), for executors that serve one."""

    def cpu_threads_env(self) -> dict[str, str]:
        """`OMP_NUM_THREADS` for an executor placed on CPU slots only (the number of slots); else nothing.

        One CPU slot is one core's worth of work, but torch (and every OpenMP library) starts one
        compute thread per core of the machine unless told otherwise: three executors on a
        2-core node each ran two spinning threads, and the LLM executor's one-thread fast path
        (decode steps on the event loop) never applied. The task manager puts this under every
        descriptor's own `ExecutorLaunchSpec.env`, which can still set another value.
        """
        if not self.devices or any(d.kind != "cpu" for d in self.devices):
            return {}
        return {"OMP_NUM_THREADS": str(len(self.devices))}


class ExecutorLaunchSpec(BaseModel):
    """How to start one executor process and know it is ready."""

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    port: int = Field(gt=0, lt=65536)
    health_path: str = "/health"
    ready_timeout_s: float = Field(default=300.0, gt=0)
    channel_port: int | None = Field(default=None, gt=0, lt=65536)
    """Where the executor serves the invocation channel on its host; None: HTTP only (vLLM, the LLM executor)."""


class ExecutorRequest(BaseModel):
    """One HTTP request to an executor, built from an invocation."""

    method: Literal["GET", "POST"] = "POST"
    path: str
    body: dict[str, Any] | None = None
    stream: bool = False


class TaskExecutionDescriptor(BaseModel, Generic[TaskT]):
    """Base class of execution descriptors; `TaskExecutionDescriptor[MyTask]` names the task it runs.

    Concrete descriptors are registered by (library, qualified name) so they can be rebuilt from
    JSON anywhere.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if is_concrete(cls) and not inspect.isabstract(cls):
            DESCRIPTORS.register(cls)

    @classmethod
    def task_cls(cls) -> type[UnitTask[Any, Any]] | None:
        """The unit task class this descriptor executes (its generic argument); None if it runs any.

        Whether that class is a unit task is checked where a task is given a descriptor
        (`UnitTask`), which is also where the answer matters.
        """
        args = generic_args(cls, TaskExecutionDescriptor)
        if not args or is_unbound(args[0]):
            return None
        if not isinstance(args[0], type):
            raise TaskDefinitionError(
                f"{cls.__name__} must name a unit task class: class {cls.__name__}(TaskExecutionDescriptor[MyTask])"
            )
        return args[0]

    # ----- launching -------------------------------------------------------------------------------

    def num_devices(self, task: TaskT) -> int:
        """How many devices one executor of `task` needs."""
        return 1

    def executor_args(self) -> list[str]:
        """Arguments from this config that reach the executor's command line as they are (none here).

        A descriptor that passes user-written arguments through (e.g. `VLLMDescriptor.extra_args`)
        returns them, so the gateway and the task manager can refuse flags that widen exposure
        (`cornserve.task.executor_flags`).
        """
        return []

    def launch_spec(self, task: TaskT, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """The command line and environment of one executor process."""
        raise NotImplementedError(f"{type(self).__name__} does not describe how to launch an executor")

    # ----- invocation ------------------------------------------------------------------------------

    def to_request(self, task: TaskT, invocation: TaskInvocation) -> ExecutorRequest:
        """Turn one invocation (input with wired DataForwards) into an executor HTTP request."""
        raise NotImplementedError(f"{type(self).__name__} does not describe executor requests")

    def from_response(self, task: TaskT, invocation: TaskInvocation, body: Any) -> TaskOutput:
        """Turn the executor's JSON response into the task output (default: validate it as the output model)."""
        return task.output_cls().model_validate(body)

    def from_stream_line(self, task: TaskT, invocation: TaskInvocation, line: str) -> Any | None:
        """Turn one line of a streamed response into one stream item, or None to skip the line."""
        raise NotImplementedError(f"{type(self).__name__} does not describe streamed responses")

    def stream_item_json(self, task: TaskT, invocation: TaskInvocation, line: str) -> bytes | None:
        """One line of a streamed response as its item's JSON object (UTF-8), or None to skip the line.

        What the dispatcher's relay calls for every line. The relay only frames items: the caller
        validates each one once, against the stream's item type, so a descriptor whose lines carry
        the item's JSON as it is may return that text after checking it is one JSON object
        (`OpenAIChatDescriptor` does), which saves building and dumping a model per item. The
        default goes through `from_stream_line`. Raise (any exception) for a line that means the
        stream failed.
        """
        item = self.from_stream_line(task, invocation, line)
        if item is None:
            return None
        if isinstance(item, BaseModel):
            return item.model_dump_json().encode()
        if isinstance(item, dict):
            return json.dumps(item, separators=(",", ":")).encode()
        raise TypeError(f"stream items must be pydantic models or JSON objects, got {type(item).__name__}")
