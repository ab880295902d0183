"""The test task libraries and the one way tests upload a library to the KV bucket.

`upload_library` does what `cornserve tasklib add` does: load the source once to learn its unit
tasks and descriptors, then store the record where every service's library sync finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import nats

from cornserve.bus.control import KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import kv_put, open_bucket
from cornserve.task import UnitTask
from cornserve.task.library import load_task_library

HERE = Path(__file__).parent


@dataclass(frozen=True)
class TaskLibrarySource:
    """A task library the tests upload as source: its registered name and its text."""

    name: str
    source: str

    @classmethod
    def from_file(cls, name: str, path: Path) -> TaskLibrarySource:
        return cls(name, path.read_text())

    def load(self) -> ModuleType:
        """The library loaded into the test process, exactly as services load it (once per version)."""
        return load_task_library(self.name, self.source).module


async def upload_library(nats_url: str, library: TaskLibrarySource) -> TaskLibraryRecord:
    """Store `library` in the task-library KV bucket (as `cornserve tasklib add` does)."""
    loaded = load_task_library(library.name, library.source)
    record = TaskLibraryRecord.from_loaded(library.source, loaded)
    nc = await nats.connect(nats_url)
    try:
        await kv_put(await open_bucket(nc, KV_TASKLIBS), library.name, record)
    finally:
        await nc.close()
    return record


TENSOR_MATH_PATH = HERE / "tasklib_tensor_math.py"
TENSOR_MATH = TaskLibrarySource.from_file("tensor-math", TENSOR_MATH_PATH)
"""MakeMatrix, MatMul, Reduce, RowSums: real torch math in `python -m cornserve.executor` processes."""

ECHO_EXECUTOR_SCRIPT = HERE / "echo_executor.py"
ECHO = TaskLibrarySource(
    "cs-test-echo",
    """
import sys

from cornserve.task import ExecutorLaunchSpec, ExecutorRequest, TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask

EXECUTOR_SCRIPT = @SCRIPT@


class EchoInput(TaskInput):
    text: str


class EchoOutput(TaskOutput):
    text: str
    executor_id: str


class EchoTask(UnitTask[EchoInput, EchoOutput]):
    default_descriptor = "EchoDescriptor"
    label: str
    devices: int = 1
    crash: bool = False


class EchoDescriptor(TaskExecutionDescriptor[EchoTask]):
    def num_devices(self, task):
        return task.devices

    def launch_spec(self, task, context):
        command = [
            sys.executable, EXECUTOR_SCRIPT,
            "--host", context.host, "--port", str(context.port),
            "--executor-id", context.executor_id,
            "--ranks", ",".join(map(str, context.sidecar_ranks)),
        ]
        if task.crash:
            command.append("--crash")
        return ExecutorLaunchSpec(command=command, env={"ECHO_LABEL": task.label}, port=context.port, ready_timeout_s=60)

    def to_request(self, task, invocation):
        return ExecutorRequest(path="/echo", body={"text": invocation.task_input.text})
""".replace("@SCRIPT@", repr(str(ECHO_EXECUTOR_SCRIPT))),
)
"""One echo unit task whose executor (echo_executor.py) the task and resource manager tests launch."""


def echo_task(label: str, **config: Any) -> UnitTask[Any, Any]:
    """An `EchoTask` of the echo library (loaded into the test process first)."""
    task = ECHO.load().EchoTask(label=label, **config)
    assert isinstance(task, UnitTask)
    return task
