"""`TaskInvocation`: one call of a unit task in a recorded graph, and its JSON wire form.

Invocations are what graph runners execute and what crosses every service boundary (gateway →
dispatcher → executors), so their wire form keeps output placeholders: `DataForward`s as they are
and `Unmaterialized` markers as `{"__unmaterialized__": ...}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, SkipValidation, ValidationError, model_serializer, model_validator

from cornserve.task.errors import TaskSerializationError
from cornserve.task.forward import DataForward, Unmaterialized
from cornserve.task.io_models import TaskInput, TaskOutput
from cornserve.task.registry import deserialize_shared_task, serialize_task

if TYPE_CHECKING:
    from cornserve.task.base import UnitTask

_UNMATERIALIZED_KEY = "__unmaterialized__"


def _dump_value(value: Any) -> Any:
    """JSON-able dump that keeps placeholder markers (model_dump would try to stringify them)."""
    if isinstance(value, Unmaterialized):
        return {_UNMATERIALIZED_KEY: repr(value)}
    if isinstance(value, DataForward):
        return value.model_dump(mode="json")
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return {
            name: _dump_value(value.__dict__.get(name)) for name, info in fields.items() if not info.exclude
        }
    if isinstance(value, (list, tuple)):
        return [_dump_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump_value(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TaskSerializationError(f"cannot serialize a {type(value).__name__} inside a task output")


def _has_marker(data: Any) -> bool:
    if isinstance(data, dict):
        return _UNMATERIALIZED_KEY in data or any(_has_marker(v) for v in data.values())
    if isinstance(data, list):
        return any(_has_marker(v) for v in data)
    return False


def _load_output(output_cls: type[TaskOutput], data: Any, task_name: str) -> TaskOutput:
    if not isinstance(data, dict):
        raise TaskSerializationError(f"the output of {task_name} must be a JSON object")
    if not _has_marker(data):
        return output_cls.model_validate(data)
    values: dict[str, Any] = {}
    for name, raw in data.items():
        if isinstance(raw, dict) and _UNMATERIALIZED_KEY in raw:
            values[name] = Unmaterialized(task_name, name)
        elif isinstance(raw, dict) and set(raw) == set(DataForward.model_fields):
            values[name] = DataForward[Any].model_validate(raw)
        else:
            values[name] = raw
    return output_cls.model_construct(**values)


def _dump_output(output: TaskOutput) -> dict[str, Any]:
    dumped = _dump_value(output)
    assert isinstance(dumped, dict)
    return dumped


class TaskInvocation(BaseModel):
    """One call of a unit task in a recorded graph: the task, its input, and its output placeholder."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    if TYPE_CHECKING:
        task: UnitTask[Any, Any]
    else:
        # Typed loosely at runtime so this module does not import the task classes (which import it).
        task: SkipValidation[Any]
    task_input: SkipValidation[TaskInput]
    task_output: SkipValidation[TaskOutput]

    @model_validator(mode="after")
    def _check_types(self) -> TaskInvocation:
        if not hasattr(self.task, "deployment_key"):
            raise TypeError(f"TaskInvocation.task must be a UnitTask, not {type(self.task).__name__}")
        if not isinstance(self.task_input, TaskInput) or not isinstance(self.task_output, TaskOutput):
            raise TypeError("TaskInvocation.task_input/task_output must be TaskInput/TaskOutput instances")
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_wire(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("task"), dict):
            return data
        task = deserialize_shared_task(data["task"])  # one instance per wire form (tasks are frozen)
        name = type(task).__name__
        try:
            task_input = task.input_cls().model_validate(data.get("task_input"))
        except ValidationError as exc:
            raise TaskSerializationError(f"invalid input for {name}: {exc}") from exc
        try:
            task_output = _load_output(task.output_cls(), data.get("task_output"), name)
        except ValidationError as exc:
            raise TaskSerializationError(f"invalid output for {name}: {exc}") from exc
        return {"task": task, "task_input": task_input, "task_output": task_output}

    @model_serializer(mode="plain")
    def _to_wire(self) -> dict[str, Any]:
        return {
            "task": serialize_task(self.task),
            "task_input": self.task_input.model_dump(mode="json"),
            "task_output": _dump_output(self.task_output),
        }
