"""The Task base classes: composite `Task` and `UnitTask`.

Imports only downwards: recording (`context`), execution (`execution`) and the registries are
modules below this one, so `await task(x)` needs no function-local import.
"""

from __future__ import annotations

import inspect
import json
import weakref
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from cornserve.task.context import current_context
from cornserve.task.descriptor import TaskExecutionDescriptor
from cornserve.task.errors import TaskDefinitionError
from cornserve.task.execution import execute_task, trace_task
from cornserve.task.forward import DataForward, Unmaterialized
from cornserve.task.generics import generic_args, is_concrete, is_unbound
from cornserve.task.io_models import TaskInput, TaskOutput, as_model
from cornserve.task.nested import nested_values
from cornserve.task.placement import NodePlacement
from cornserve.task.registry import DESCRIPTORS, UNIT_TASKS, ClassKey, task_deployment_key

if TYPE_CHECKING:
    from cornserve.task.graph import TaskGraph

_IO_TYPES: weakref.WeakKeyDictionary[type, tuple[Any, Any]] = weakref.WeakKeyDictionary()
"""Each task class's (input, output) types: read on every hop of every invocation, computed once."""

__all__ = ["InputT", "OutputT", "Task", "TaskInput", "TaskOutput", "UnitTask", "discover_unit_tasks"]

InputT = TypeVar("InputT", bound=TaskInput)
OutputT = TypeVar("OutputT", bound=TaskOutput)


def _iter_tasks(value: Any) -> Iterator[Task[Any, Any]]:
    """Tasks held directly or in lists, tuples and dicts (a task's own subtasks are not entered)."""
    for item in nested_values(value, into_models=False):
        if isinstance(item, Task):
            yield item


class Task(BaseModel, Generic[InputT, OutputT]):
    """A reusable, composable unit of work.

    A task's fields are its configuration. `invoke` composes other tasks synchronously; calling the
    task with `await task(input)` records the graph `invoke` makes, has the current graph runner
    execute it, and replays `invoke` with the real outputs. Subtasks created in `post_init` (by
    assigning them to attributes) or passed as fields are discovered automatically.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    _subtasks: dict[str, Any] = PrivateAttr(default_factory=dict)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:
            order = self._positional_fields()
            if len(args) > len(order):
                raise TypeError(f"{type(self).__name__} takes at most {len(order)} positional arguments")
            for name, value in zip(order, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__} got multiple values for argument {name!r}")
                kwargs[name] = value
        super().__init__(**kwargs)

    @classmethod
    def _positional_fields(cls) -> list[str]:
        """Field order for positional construction: the class's own fields, configuration last."""
        return list(cls.model_fields)

    def model_post_init(self, context: Any) -> None:
        """Run `post_init`, where composite tasks create their subtasks."""
        self.post_init()

    def post_init(self) -> None:
        """Create subtasks here by assigning them to attributes (e.g. `self.llm = LLMTask(...)`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).model_fields or name.startswith("_"):
            super().__setattr__(name, value)
            return
        if next(_iter_tasks(value), None) is None:
            raise TaskDefinitionError(
                f"{type(self).__name__}.{name}: only subtasks (Task instances, or lists/dicts of them) "
                "can be assigned as attributes; declare configuration as pydantic fields instead"
            )
        self._subtasks[name] = value

    def __getattr__(self, name: str) -> Any:
        private = object.__getattribute__(self, "__pydantic_private__")
        if private is not None and name in private.get("_subtasks", {}):
            return private["_subtasks"][name]
        return super().__getattr__(name)  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        """Tasks are equal when they are of the same class with the same configuration."""
        if not isinstance(other, Task):
            return NotImplemented
        return type(self) is type(other) and self.model_dump(mode="json") == other.model_dump(mode="json")

    def __hash__(self) -> int:
        return hash((type(self), json.dumps(self.model_dump(mode="json"), sort_keys=True)))

    # ----- types -----------------------------------------------------------------------------------

    @classmethod
    def input_cls(cls) -> type[TaskInput]:
        """The input model class declared by `Task[InputT, OutputT]`."""
        return cast(type[TaskInput], cls._io_types()[0])

    @classmethod
    def output_cls(cls) -> type[TaskOutput]:
        """The output model class declared by `Task[InputT, OutputT]`."""
        return cast(type[TaskOutput], cls._io_types()[1])

    @classmethod
    def _io_types(cls) -> tuple[Any, Any]:
        known = _IO_TYPES.get(cls)
        if known is not None:
            return known
        args = generic_args(cls, Task)
        if args is None or len(args) != 2 or any(is_unbound(a) for a in args):
            raise TaskDefinitionError(
                f"{cls.__name__} must declare its input and output types: class {cls.__name__}(Task[MyInput, MyOutput])"
            )
        _IO_TYPES[cls] = (args[0], args[1])
        return args[0], args[1]

    # ----- composition -----------------------------------------------------------------------------

    def subtasks(self) -> list[Task[Any, Any]]:
        """Direct subtasks: tasks held in fields and tasks assigned as attributes, in order."""
        found: list[Task[Any, Any]] = []
        for name in type(self).model_fields:
            found.extend(_iter_tasks(self.__dict__.get(name)))
        for value in self._subtasks.values():
            found.extend(_iter_tasks(value))
        return found

    @abstractmethod
    def invoke(self, task_input: InputT) -> OutputT:
        """Compose other tasks (composite) or describe one executor call (unit); synchronous."""

    async def __call__(self, task_input: InputT) -> OutputT:
        """Record the graph, have the current graph runner execute it, and replay with real outputs."""
        return cast(OutputT, await execute_task(self, self._coerce_input(task_input)))

    def trace(self, task_input: InputT) -> TaskGraph:
        """Record the graph this task makes for `task_input` without executing anything."""
        return trace_task(self, self._coerce_input(task_input))

    def _coerce_input(self, task_input: Any) -> TaskInput:
        input_cls = self.input_cls()
        coerced = as_model(task_input, input_cls)
        if coerced is not None:
            return coerced
        raise TypeError(
            f"{type(self).__name__} takes a {input_cls.__name__} (or a dict of its fields), "
            f"not {type(task_input).__name__}"
        )

    def display_name(self) -> str:
        """A short human-readable name for errors and graph pictures."""
        return type(self).__name__


class UnitTask(Task[InputT, OutputT]):
    """A task executed by exactly one deployed executor.

    Subclasses implement `make_output_placeholder` (what the output looks like before execution,
    e.g. one `DataForward` per item) and set `default_descriptor` to the qualified name of their
    default `TaskExecutionDescriptor` class, defined in the same library (module or task library).
    """

    default_descriptor: ClassVar[str] = ""

    # Typed as the unparametrized base so any descriptor subclass instance passes through as is.
    descriptor: TaskExecutionDescriptor = Field(  # type: ignore[type-arg]
        default=None,  # type: ignore[arg-type]  # _fill_descriptor puts the default descriptor here
        validation_alias=AliasChoices("descriptor", "execution_descriptor"),
        description="How this task is executed; defaults to an instance of the class's default descriptor.",
    )

    placement: NodePlacement | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Nodes this task's executors may run on (default: any); part of the key only when set.",
    )

    _deployment_key: str | None = PrivateAttr(default=None)

    @classmethod
    def _positional_fields(cls) -> list[str]:
        own = [name for name in cls.model_fields if name not in ("descriptor", "placement")]
        return [*own, "descriptor", "placement"]

    @model_validator(mode="before")
    @classmethod
    def _fill_descriptor(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("descriptor") is None
            and data.get("execution_descriptor") is None
        ):
            if not cls.default_descriptor:
                raise TaskDefinitionError(f"{cls.__name__} has no default_descriptor; pass descriptor=...")
            data = {k: v for k, v in data.items() if k not in ("descriptor", "execution_descriptor")}
            library = ClassKey.of(cls).library
            data["descriptor"] = DESCRIPTORS.lookup(ClassKey(library, cls.default_descriptor))()
        return data

    @field_validator("descriptor", mode="before")
    @classmethod
    def _load_descriptor(cls, value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"name", "config"}:
            return DESCRIPTORS.lookup(ClassKey.parse(value["name"])).model_validate(value["config"])
        return value

    @model_validator(mode="after")
    def _check_descriptor(self) -> UnitTask[InputT, OutputT]:
        runs = self.descriptor.task_cls()
        if runs is not None and not (isinstance(runs, type) and issubclass(runs, UnitTask)):
            raise TaskDefinitionError(
                f"{type(self.descriptor).__name__} must name a unit task class, not {runs!r}: "
                f"class {type(self.descriptor).__name__}(TaskExecutionDescriptor[MyTask])"
            )
        if runs is not None and not isinstance(self, runs):
            raise TaskDefinitionError(
                f"{type(self.descriptor).__name__} executes {runs.__name__}, not {type(self).__name__}"
            )
        return self

    @field_serializer("descriptor")
    def _dump_descriptor(
        self, value: TaskExecutionDescriptor[Any], info: SerializationInfo
    ) -> dict[str, Any]:
        key = DESCRIPTORS.key_of(type(value)) or ClassKey.of(type(value))
        return {"name": key.ref, "config": value.model_dump(mode=info.mode)}

    @property
    def deployment_key(self) -> str:
        """Equal for two instances that must share one deployment (class, descriptor and config)."""
        # Read from the private dict directly: `self._deployment_key` goes through `Task.__getattr__`
        # and pydantic's, which cost ~10% of a dispatcher's CPU (it is read on every hop of a graph).
        private = self.__pydantic_private__
        key = private.get("_deployment_key") if private is not None else None
        if key is None:
            key = task_deployment_key(self)
            self._deployment_key = key
        return key

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "invoke" in cls.__dict__:
            raise TaskDefinitionError(
                f"{cls.__name__} is a UnitTask and must not override invoke(): a unit task is executed "
                "by its executor; describe its output shape with make_output_placeholder() instead"
            )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if is_concrete(cls) and not inspect.isabstract(cls):
            UNIT_TASKS.register(cls)

    def invoke(self, task_input: InputT) -> OutputT:
        """Add this call to the active recording, or take its real output during replay."""
        return cast(OutputT, current_context(self).unit_invoke(self, task_input))

    def make_output_placeholder(self, task_input: InputT) -> OutputT:
        """The output as seen while recording.

        The default fills `DataForward` fields with fresh forwards and every other field with an
        `Unmaterialized` marker. Override it when the output shape depends on the input (e.g. one
        forward per input item) or the output is a `Stream`.
        """
        output_cls = self.output_cls()
        values: dict[str, Any] = {}
        for name, field in output_cls.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, DataForward):
                values[name] = annotation()
            else:
                values[name] = Unmaterialized(self.display_name(), name)
        return cast(OutputT, output_cls.model_construct(**values))

    def validate_input(self, task_input: InputT) -> None:
        """Check an input against this task's configuration; raise InvalidTaskInputError if wrong."""

    def traced_output(self, task_input: InputT) -> OutputT | None:
        """A stand-in output for traces (`cornserve graph`), or None (the default).

        Tracing executes nothing, so an app's `serve` that reads a value output (e.g. a completion's
        text, to build its next graph) stops there. A task whose output has a harmless, obviously
        fake form (`LLMCompletionTask`: a completion saying it was traced) may return it, so the
        trace goes on to the graphs that follow.
        """
        return None


def discover_unit_tasks(tasks: Iterable[Task[Any, Any]]) -> list[UnitTask[Any, Any]]:
    """Flatten a tree of tasks into its distinct unit tasks (by deployment key), in discovery order."""
    seen: dict[str, UnitTask[Any, Any]] = {}

    def visit(task: Task[Any, Any]) -> None:
        if isinstance(task, UnitTask):
            seen.setdefault(task.deployment_key, task)
        for sub in task.subtasks():
            visit(sub)

    for task in tasks:
        visit(task)
    return list(seen.values())
