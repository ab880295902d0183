"""Cornserve's task abstraction.

Tasks describe work: unit tasks run on one executor, composite tasks compose other tasks in a
synchronous `invoke`. `await task(input)` records the graph, has a dispatcher execute it, and
replays `invoke` with the real outputs. See docs/tasks.md.
"""

from cornserve.task.base import Task, TaskInput, TaskOutput, UnitTask, discover_unit_tasks
from cornserve.task.context import TaskContext, TaskInvocation
from cornserve.task.descriptor import (
    Device,
    ExecutorLaunchContext,
    ExecutorLaunchSpec,
    ExecutorRequest,
    TaskExecutionDescriptor,
)
from cornserve.task.dispatcher import Dispatcher, get_dispatcher, set_dispatcher, use_dispatcher
from cornserve.task.errors import (
    InvalidTaskInputError,
    NoDispatcherError,
    StaticGraphError,
    TaskContextError,
    TaskDefinitionError,
    TaskError,
    TaskExecutionError,
    TaskRegistryError,
    TaskSerializationError,
    UnmaterializedDataError,
)
from cornserve.task.forward import DataForward, Tensor, Unmaterialized
from cornserve.task.graph import TaskGraph, forward_edges, wire_forwards
from cornserve.task.local import InProcessDispatcher, LocalForwardStore, TracingDispatcher
from cornserve.task.registry import (
    deserialize_task,
    registered_descriptors,
    registered_unit_tasks,
    serialize_task,
)
from cornserve.task.stream import Stream

__all__ = [
    "DataForward",
    "Device",
    "Dispatcher",
    "ExecutorLaunchContext",
    "ExecutorLaunchSpec",
    "ExecutorRequest",
    "InProcessDispatcher",
    "InvalidTaskInputError",
    "LocalForwardStore",
    "NoDispatcherError",
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
    "TracingDispatcher",
    "UnitTask",
    "Unmaterialized",
    "UnmaterializedDataError",
    "deserialize_task",
    "discover_unit_tasks",
    "forward_edges",
    "get_dispatcher",
    "registered_descriptors",
    "registered_unit_tasks",
    "serialize_task",
    "set_dispatcher",
    "use_dispatcher",
    "wire_forwards",
]
