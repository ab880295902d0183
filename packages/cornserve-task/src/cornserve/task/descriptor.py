"""Execution descriptors: the strategy that says how a unit task runs on an executor.

A descriptor is configuration (a pydantic model) plus behaviour: how many devices the executor
needs, the command line that launches it, and how one `TaskInvocation` becomes an HTTP request to
the executor and its (possibly streamed) response becomes the task's output.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cornserve.task.errors import TaskDefinitionError

if TYPE_CHECKING:
    from cornserve.task.base import TaskOutput, UnitTask
    from cornserve.task.context import TaskInvocation

TaskT = TypeVar("TaskT", bound="UnitTask[Any, Any]")


class Device(BaseModel):
    """One device given to an executor: a GPU, or a CPU slot on machines without GPUs."""

    kind: Literal["cuda", "cpu"]
    index: int = Field(ge=0)


class ExecutorLaunchContext(BaseModel):
    """What the task manager decided for one executor before launching it."""

    executor_id: str
    host: str = "127.0.0.1"
    port: int = Field(gt=0, lt=65536)
    devices: list[Device]
    sidecar_ranks: list[int]
    nats_url: str | None = None


class ExecutorLaunchSpec(BaseModel):
    """How to start one executor process and know it is ready."""

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    port: int = Field(gt=0, lt=65536)
    health_path: str = "/health"
    ready_timeout_s: float = Field(default=300.0, gt=0)


class ExecutorRequest(BaseModel):
    """One HTTP request to an executor, built from an invocation."""

    method: Literal["GET", "POST"] = "POST"
    path: str
    body: dict[str, Any] | None = None
    stream: bool = False


class TaskExecutionDescriptor(BaseModel, Generic[TaskT]):
    """Base class of execution descriptors; `TaskExecutionDescriptor[MyTask]` names the task it runs.

    Concrete descriptors are registered by class name so they can be rebuilt from JSON anywhere.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        meta = cls.__pydantic_generic_metadata__
        if meta["origin"] is None and not meta["parameters"] and not inspect.isabstract(cls):
            from cornserve.task.registry import register_descriptor

            register_descriptor(cls)

    @classmethod
    def task_cls(cls) -> type[UnitTask[Any, Any]]:
        """The unit task class this descriptor executes (its generic argument; any unit task if none)."""
        from cornserve.task.base import UnitTask, _generic_args

        args = _generic_args(cls, TaskExecutionDescriptor)
        if not args or isinstance(args[0], TypeVar):
            return UnitTask
        if not (isinstance(args[0], type) and issubclass(args[0], UnitTask)):
            raise TaskDefinitionError(
                f"{cls.__name__} must name a unit task class: class {cls.__name__}(TaskExecutionDescriptor[MyTask])"
            )
        return args[0]

    # ----- launching -------------------------------------------------------------------------------

    def num_devices(self, task: TaskT) -> int:
        """How many devices one executor of `task` needs."""
        return 1

    def launch_spec(self, task: TaskT, context: ExecutorLaunchContext) -> ExecutorLaunchSpec:
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
