"""Cornserve's task abstraction.

Tasks describe work: unit tasks run on one executor, composite tasks compose other tasks in a
synchronous `invoke`. `await task(input)` records the graph, has the current graph runner execute
it, and replays `invoke` with the real outputs. See docs/tasks.md.

Importing this package registers the built-in tasks (`register_builtins()`), so every service that
deserializes tasks knows them.
"""

from cornserve.task.base import Task, UnitTask, discover_unit_tasks
from cornserve.task.builtins import register_builtins
from cornserve.task.context import TaskContext
from cornserve.task.descriptor import (
    Device,
    ExecutorLaunchSpec,
    ExecutorPlacement,
    ExecutorRequest,
    TaskExecutionDescriptor,
)
from cornserve.task.errors import (
    ExecutorFlagError,
    InvalidTaskInputError,
    NoGraphRunnerError,
    StaticGraphError,
    TaskContextError,
    TaskDefinitionError,
    TaskError,
    TaskExecutionError,
    TaskRegistryError,
    TaskSerializationError,
    TracedOutputError,
    UnmaterializedDataError,
)
from cornserve.task.forward import DataForward, Tensor, Unmaterialized
from cornserve.task.graph import TaskGraph, forward_edges, wire_forwards
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskInput, TaskOutput
from cornserve.task.local import InProcessRunner, LocalForwardStore, TracingRunner
from cornserve.task.placement import NodePlacement
from cornserve.task.registry import (
    ClassKey,
    deserialize_task,
    registered_descriptors,
    registered_unit_tasks,
    serialize_task,
)
from cornserve.task.runner import GraphRunner, current_graph_runner, set_graph_runner, use_graph_runner
from cornserve.task.stream import Stream

register_builtins()

__all__ = [
    "ClassKey",
    "DataForward",
    "Device",
    "ExecutorFlagError",
    "ExecutorLaunchSpec",
    "ExecutorPlacement",
    "ExecutorRequest",
    "GraphRunner",
    "InProcessRunner",
    "InvalidTaskInputError",
    "LocalForwardStore",
    "NoGraphRunnerError",
    "NodePlacement",
    "StaticGraphError",
    "Stream",
    "Task",
    "TaskContext",
    "TaskContextError",
    "TaskDefinitionError",
    "TaskError",
    "TaskExecutionDescriptor",
    "TaskExecutionError",
    "TaskGraph",
    "TaskInput",
    "TaskInvocation",
    "TaskOutput",
    "TaskRegistryError",
    "TaskSerializationError",
    "Tensor",
    "TracedOutputError",
    "TracingRunner",
    "UnitTask",
    "Unmaterialized",
    "UnmaterializedDataError",
    "current_graph_runner",
    "deserialize_task",
    "discover_unit_tasks",
    "forward_edges",
    "register_builtins",
    "registered_descriptors",
    "registered_unit_tasks",
    "serialize_task",
    "set_graph_runner",
    "use_graph_runner",
    "wire_forwards",
]
