"""`PythonExecutorDescriptor`: run a unit task with an async Python function from its task library.

A task library defines a unit task, a descriptor subclass naming a handler function, and the
handler itself in one module. The descriptor launches `python -m cornserve.executor`, which loads
that module (through the task library sync) and calls the handler for every invocation. This
module is imported by every service that loads task libraries, so it stays light: no aiohttp,
no torch, no sidecar client.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import cache
from typing import Any, Generic, cast

from pydantic import Field, TypeAdapter, ValidationError

from cornserve.task.descriptor import (
    ExecutorLaunchSpec,
    ExecutorPlacement,
    ExecutorRequest,
    TaskExecutionDescriptor,
    TaskT,
)
from cornserve.task.errors import TaskDefinitionError, TaskExecutionError
from cornserve.task.forward import DataForward, iter_forwards
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskOutput
from cornserve.task.registry import serialize_task
from cornserve.task.stream import Stream

INVOKE_PATH = "/invoke"
HEALTH_PATH = "/health"


def stream_item_type(output_cls: type[TaskOutput]) -> Any | None:
    """`Stream.item_type()` of a streamed output class (X of `Stream[X]`); None when it does not stream."""
    return output_cls.item_type() if issubclass(output_cls, Stream) else None


@cache
def item_adapter(item_type: Any) -> TypeAdapter[Any]:
    """A (cached) validator/serializer for one stream item type."""
    return TypeAdapter(item_type)


def error_line_message(payload: Any) -> str | None:
    """The message of a stream's `{"error": "..."}` line, or None for an ordinary item."""
    if isinstance(payload, dict) and set(payload) == {"error"} and isinstance(payload["error"], str):
        return payload["error"]
    return None


def _swap_forwards(value: Any, recorded: dict[str, DataForward[Any]]) -> Any:
    """Replace every forward-shaped dict in a JSON body by the recorded (wired) forward's dump."""
    if isinstance(value, dict):
        if set(value) == set(DataForward.model_fields) and value.get("id") in recorded:
            return recorded[value["id"]].model_dump(mode="json")
        return {k: _swap_forwards(v, recorded) for k, v in value.items()}
    if isinstance(value, list):
        return [_swap_forwards(v, recorded) for v in value]
    return value


class PythonExecutorDescriptor(TaskExecutionDescriptor[TaskT], Generic[TaskT]):
    """Execute a unit task by calling `handler`, an async function in the task class's module.

    Subclass it once per task in the task library, giving `handler` a default so the task's
    `default_descriptor` can be built without arguments::

        class MakeMatrixExecutor(PythonExecutorDescriptor[MakeMatrix]):
            handler: str = "make_matrix"

        async def make_matrix(ctx: ExecutorContext, invocation: TaskInvocation) -> MatrixOutput: ...

    The handler returns the task output (or a dict of its fields), or, for `Stream[X]` outputs,
    an async iterator of X. Exceptions it raises become the invocation's error message.
    """

    handler: str = Field(min_length=1, description="Name of the async handler function in the task's module.")
    sidecar_timeout_s: float = Field(
        default=60.0, gt=0, description="Deadline of each sidecar call (send, recv) the handler makes."
    )
    invoke_timeout_s: float = Field(
        default=300.0, gt=0, description="Deadline of one invocation (for streams: the whole stream)."
    )
    ready_timeout_s: float = Field(
        default=120.0, gt=0, description="How long the executor may take to start."
    )

    # ----- launching -------------------------------------------------------------------------------

    def launch_spec(self, task: TaskT, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """`python -m cornserve.executor --task-json ... --sidecar-ranks 0,1 ...`."""
        command = [
            sys.executable, "-m", "cornserve.executor",
            "--task-json", json.dumps(serialize_task(task), separators=(",", ":")),
            "--executor-id", placement.executor_id,
            "--host", placement.host,
            "--port", str(placement.port),
            "--sidecar-ranks", ",".join(map(str, placement.sidecar_ranks)),
        ]  # fmt: skip
        env = {
            "CORNSERVE_EXECUTOR_ID": placement.executor_id,
            "CORNSERVE_SIDECAR_RANKS": ",".join(map(str, placement.sidecar_ranks)),
        }
        if placement.channel_port is not None:
            command += ["--channel-port", str(placement.channel_port)]
        if placement.nats_url:
            command += ["--nats-url", placement.nats_url]
            env["CORNSERVE_NATS_URL"] = placement.nats_url
        cuda = [d.index for d in placement.devices if d.kind == "cuda"]
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, cuda))
        env.update(placement.cpu_threads_env())  # the task manager sets it too; kept for direct callers
        return ExecutorLaunchSpec(
            command=command,
            env=env,
            port=placement.port,
            health_path=HEALTH_PATH,
            ready_timeout_s=self.ready_timeout_s,
            channel_port=placement.channel_port,
        )

    def resolve_handler(self, task: TaskT) -> Callable[..., Any]:
        """The handler function: `handler` looked up in the module that defines the task's class."""
        module_name = type(task).__module__
        module = sys.modules.get(module_name)
        if module is None:
            raise TaskDefinitionError(
                f"the module {module_name!r} of {type(task).__name__} is not loaded; upload its task library"
            )
        fn = getattr(module, self.handler, None)
        if fn is None or not callable(fn):
            raise TaskDefinitionError(
                f"{type(self).__name__}.handler is {self.handler!r}, but the module of {type(task).__name__} "
                f"defines no function of that name"
            )
        return cast(Callable[..., Any], fn)

    # ----- invocation ------------------------------------------------------------------------------

    def to_request(self, task: TaskT, invocation: TaskInvocation) -> ExecutorRequest:
        """POST /invoke with the invocation's JSON (task, input, output with wired forwards)."""
        body = invocation.model_dump(mode="json")
        streams = stream_item_type(task.output_cls()) is not None
        return ExecutorRequest(method="POST", path=INVOKE_PATH, body=body, stream=streams)

    def from_response(self, task: TaskT, invocation: TaskInvocation, body: Any) -> TaskOutput:
        """The output validated from the body; its forwards are the recorded ones, with wired ranks."""
        output_cls = task.output_cls()
        name = task.display_name()
        if stream_item_type(output_cls) is not None:
            raise TaskExecutionError(f"{name} streams its output, but a non-streamed response was received")
        if not isinstance(body, dict):
            raise TaskExecutionError(
                f"{name}'s executor replied with {type(body).__name__}, not a JSON object"
            )
        recorded = {f.id: f for f in iter_forwards(invocation.task_output)}
        if recorded:
            got = {f.id for f in iter_forwards(self._validate(output_cls, body, name))}
            if got != set(recorded):
                raise TaskExecutionError(
                    f"{name}'s executor returned forwards {sorted(got)}, but the recorded output has "
                    f"{sorted(recorded)}; a handler must return the forwards of invocation.task_output"
                )
            body = _swap_forwards(body, recorded)
        return self._validate(output_cls, body, name)

    @staticmethod
    def _validate(output_cls: type[TaskOutput], body: dict[str, Any], name: str) -> TaskOutput:
        try:
            return output_cls.model_validate(body)
        except ValidationError as exc:
            raise TaskExecutionError(f"{name}'s executor returned an invalid output: {exc}") from exc

    def from_stream_line(self, task: TaskT, invocation: TaskInvocation, line: str) -> Any | None:
        """One ndjson line → one stream item; blank lines are skipped; `{"error": ...}` raises."""
        line = line.strip()
        if not line:
            return None
        name = task.display_name()
        try:
            payload = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskExecutionError(
                f"{name}'s executor streamed a line that is not JSON: {line[:200]!r}"
            ) from exc
        message = error_line_message(payload)
        if message is not None:
            raise TaskExecutionError(message, task_name=name)
        item_type = stream_item_type(task.output_cls())
        if item_type is None:
            raise TaskExecutionError(f"{name} does not stream, but a streamed response was received")
        try:
            item = item_adapter(item_type).validate_python(payload)
        except ValidationError as exc:
            raise TaskExecutionError(f"{name}'s executor streamed an invalid item: {exc}") from exc
        return item
