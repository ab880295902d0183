"""Task libraries: user task classes uploaded as source."""

from __future__ import annotations

import pytest

from cornserve.task import TaskDefinitionError, deserialize_task, registered_unit_tasks, serialize_task
from cornserve.task.library import library_sha256, load_task_library, loaded_libraries

LIB = """
from cornserve.task import DataForward, Tensor, TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask

class LibIn(TaskInput):
    n: int

class LibOut(TaskOutput):
    t: DataForward[Tensor]

class LibTask(UnitTask[LibIn, LibOut]):
    default_descriptor = "LibDescriptor"
    size: int = VERSION

class LibDescriptor(TaskExecutionDescriptor[LibTask]):
    pass
"""


def test_load_register_reload_and_import() -> None:
    first = load_task_library("demo-lib", LIB.replace("VERSION", "1"))
    assert first.unit_tasks == ["LibTask"] and first.descriptors == ["LibDescriptor"]
    assert (
        load_task_library("demo-lib", LIB.replace("VERSION", "1")).module is first.module
    )  # same version: no-op
    task = registered_unit_tasks()["demo-lib:LibTask"]()
    assert deserialize_task(serialize_task(task)) == task

    second = load_task_library("demo-lib", LIB.replace("VERSION", "2"))
    assert second.sha256 == library_sha256(LIB.replace("VERSION", "2")) != first.sha256
    assert registered_unit_tasks()["demo-lib:LibTask"]().size == 2
    assert loaded_libraries()["demo-lib"] == second.sha256

    from cornserve_tasklibs.demo_lib import LibTask  # type: ignore[import-not-found]

    assert LibTask().size == 2


def test_bad_libraries() -> None:
    with pytest.raises(TaskDefinitionError, match="invalid task library name"):
        load_task_library("Bad Name", "x = 1")
    with pytest.raises(TaskDefinitionError, match="task library 'broken' failed to load: ZeroDivisionError"):
        load_task_library("broken", "x = 1 / 0")
    # A stray sys.exit() in a library fails that library, not the service loading it.
    with pytest.raises(TaskDefinitionError, match="task library 'exits' failed to load: SystemExit"):
        load_task_library("exits", "import sys\nsys.exit(3)")
    assert "exits" not in loaded_libraries()
