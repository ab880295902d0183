"""Typed errors of the task abstraction.

Every error says which task (and, for graphs, which position) broke a rule, so an app author can
find the line to fix without reading framework code.
"""

from __future__ import annotations


class TaskError(Exception):
    """Base class of every error raised by `cornserve.task`."""


class TaskDefinitionError(TaskError, TypeError):
    """A task, descriptor or output class is defined in a way the framework cannot use."""


class TaskRegistryError(TaskError, LookupError):
    """A unit task or descriptor name is unknown, or two different classes claim one name."""


class ExecutorFlagError(TaskError, ValueError):
    """A task config passes an executor flag that widens exposure and no admin allowed it.

    See `cornserve.task.executor_flags`; `flag` is the refused flag's full name.
    """

    def __init__(self, message: str, *, flag: str) -> None:
        super().__init__(message)
        self.flag = flag


class TaskSerializationError(TaskError):
    """Serialized task or invocation data does not describe a valid object."""


class InvalidTaskInputError(TaskError, ValueError):
    """A task input is invalid for the task it was given to (e.g. an undeclared modality)."""


class StaticGraphError(TaskError):
    """A rule of the static-graph model was broken.

    The execution DAG must be fully determined by the request: replay must make exactly the
    recorded invocations, intermediate data cannot be inspected while recording, a `Stream` output
    must be the graph's result, every stream forward (`DataForward[Stream[T]]`) has exactly one
    consumer, and every other forwarded value must be consumed or returned.
    """


class UnmaterializedDataError(StaticGraphError):
    """Code looked inside data that does not exist yet in the app driver.

    While a graph is being recorded, task outputs are placeholders; and `DataForward` contents never
    reach the app driver at all (they travel executor to executor through the sidecar).
    """


class TracedOutputError(UnmaterializedDataError):
    """An app's `serve` used a value output of a graph that was only traced (`TracingRunner`).

    Not a mistake of the app: tracing executes nothing, so whatever `serve` does with real outputs
    (e.g. a second graph built from the first one's text) cannot be traced past this point.
    """


class NoGraphRunnerError(TaskError, RuntimeError):
    """`await task(...)` was called but no graph runner is configured to execute the graph."""


class TaskExecutionError(TaskError, RuntimeError):
    """An invocation of a graph failed while executing; the whole graph failed with it."""

    def __init__(self, message: str, *, task_name: str | None = None, position: int | None = None) -> None:
        super().__init__(message)
        self.task_name = task_name
        self.position = position


class TaskContextError(TaskError, RuntimeError):
    """A unit task's invoke() ran outside `await task(...)` or `task.trace(...)`."""
