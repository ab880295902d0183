"""Serialization, registries, equivalence and deployment keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter
from tests.task.helpers import MakeTensor, NumbersInput, Pipeline, PipelineInput, SumOutput
from tests.task.helpers import Sum as HelperSum

from cornserve.task import (
    TaskDefinitionError,
    TaskExecutionDescriptor,
    TaskInvocation,
    TaskRegistryError,
    TaskSerializationError,
    UnitTask,
    Unmaterialized,
    deserialize_task,
    discover_unit_tasks,
    registered_descriptors,
    registered_unit_tasks,
    serialize_task,
)
from cornserve.task.builtins import (
    ChatCompletionRequest,
    CPULLMDescriptor,
    EncoderTask,
    EricDescriptor,
    LLMTask,
    MLLMTask,
    Modality,
    VLLMDescriptor,
)
from cornserve.task.registry import UNIT_TASKS, ClassKey

INVOCATIONS = TypeAdapter(list[TaskInvocation])


def builtin_tasks() -> list[UnitTask[Any, Any]]:
    return [
        EncoderTask(modality=Modality.IMAGE, model_id="m", max_batch_size=4),
        EncoderTask(modality=Modality.AUDIO, model_id="m", descriptor=EricDescriptor(tensor_parallel_size=2)),
        LLMTask(model_id="m", receive_embeddings=True),
        LLMTask(model_id="m", descriptor=VLLMDescriptor(tensor_parallel_size=2, max_model_len=4096)),
        MakeTensor(label="x"),
    ]


@pytest.mark.parametrize("task", builtin_tasks(), ids=lambda t: t.deployment_key)
def test_serialize_round_trip(task: UnitTask[Any, Any]) -> None:
    data = serialize_task(task)
    assert data["name"] == f"{type(task).__module__}:{type(task).__qualname__}"
    wire = json.loads(json.dumps(data))
    back = deserialize_task(wire)
    assert type(back) is type(task)
    assert back == task
    assert type(back.descriptor) is type(task.descriptor)
    assert back.deployment_key == task.deployment_key
    assert serialize_task(back) == data


def test_deployment_key_equivalence() -> None:
    a = EncoderTask(modality=Modality.IMAGE, model_id="m")
    b = EncoderTask(modality=Modality.IMAGE, model_id="m", descriptor=EricDescriptor())
    assert a is not b
    assert a.deployment_key == b.deployment_key
    distinct = {
        a.deployment_key,
        EncoderTask(modality=Modality.VIDEO, model_id="m").deployment_key,
        EncoderTask(modality=Modality.IMAGE, model_id="other").deployment_key,
        EncoderTask(modality=Modality.IMAGE, model_id="m", max_batch_size=1).deployment_key,
        EncoderTask(
            modality=Modality.IMAGE, model_id="m", descriptor=EricDescriptor(tensor_parallel_size=2)
        ).deployment_key,
        LLMTask(model_id="m").deployment_key,
        LLMTask(model_id="m", descriptor=VLLMDescriptor()).deployment_key,
    }
    assert len(distinct) == 7
    for key in distinct:
        assert key == key.lower() and all(c.isalnum() or c == "-" for c in key)


def test_deployment_key_is_stable_across_processes() -> None:
    code = (
        "from cornserve.task.builtins import EncoderTask, Modality;"
        "print(EncoderTask(modality=Modality.IMAGE, model_id='m', max_batch_size=4).deployment_key)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert (
        out.stdout.strip()
        == EncoderTask(modality=Modality.IMAGE, model_id="m", max_batch_size=4).deployment_key
    )


def test_shared_encoder_is_discovered_once() -> None:
    first = MLLMTask(model_id="m", modalities=[Modality.IMAGE])
    second = MLLMTask(model_id="m", modalities=[Modality.IMAGE, Modality.VIDEO])
    units = discover_unit_tasks([first, second])
    names = sorted(t.display_name() for t in units)
    assert names == ["EncoderTask[image]", "EncoderTask[video]", "LLMTask[embeddings]"]


def test_registries_list_builtins_and_custom_tasks() -> None:
    tasks = registered_unit_tasks()
    assert tasks["cornserve.task.builtins.encoder:EncoderTask"] is EncoderTask
    assert tasks["cornserve.task.builtins.llm:LLMTask"] is LLMTask
    assert (
        tasks["tests.task.helpers:MakeTensor"] is MakeTensor and tasks["tests.task.helpers:Sum"] is HelperSum
    )
    assert not any(name.endswith(":MLLMTask") for name in tasks)  # composites are not deployed
    descriptors = registered_descriptors()
    assert descriptors["cornserve.task.builtins.encoder:EricDescriptor"] is EricDescriptor
    assert descriptors["cornserve.task.builtins.llm:VLLMDescriptor"] is VLLMDescriptor
    assert descriptors["cornserve.task.builtins.llm:CPULLMDescriptor"] is CPULLMDescriptor
    assert not any(name.endswith(":OpenAIChatDescriptor") for name in descriptors)  # abstract


def test_deserialize_errors() -> None:
    encoder = "cornserve.task.builtins.encoder:EncoderTask"
    with pytest.raises(
        TaskRegistryError, match=r"unknown unit task 'NoSuchTask'; registered: .*:EncoderTask"
    ):
        deserialize_task({"name": "NoSuchTask", "config": {}})
    with pytest.raises(TaskRegistryError, match=r"unknown unit task 'other\.module:EncoderTask'"):
        deserialize_task({"name": "other.module:EncoderTask", "config": {}})
    with pytest.raises(TaskSerializationError, match=r"invalid configuration for .*:EncoderTask"):
        deserialize_task({"name": encoder, "config": {"modality": "smell", "model_id": "m"}})
    with pytest.raises(TaskSerializationError, match="a serialized task is"):
        deserialize_task({"name": encoder})
    with pytest.raises(TaskRegistryError, match="unknown execution descriptor 'Nope'"):
        deserialize_task(
            {
                "name": encoder,
                "config": {
                    "modality": "image",
                    "model_id": "m",
                    "descriptor": {"name": "Nope", "config": {}},
                },
            }
        )
    with pytest.raises(TaskSerializationError, match="composite task"):
        serialize_task(MLLMTask(model_id="m"))  # type: ignore[arg-type]


def test_equal_class_names_in_different_modules_do_not_collide() -> None:
    """Keys are (library, qualified name): a second `Sum` elsewhere is a different registered task."""

    class Sum(UnitTask[NumbersInput, SumOutput]):  # the same __name__ as tests.task.helpers.Sum
        pass

    class SumRunner(TaskExecutionDescriptor[Sum]):
        pass

    assert ClassKey.of(Sum) == ClassKey("tests.task.test_serialization", Sum.__qualname__)
    assert ClassKey.of(Sum) != ClassKey.of(HelperSum)
    registered = registered_unit_tasks()
    assert registered[f"tests.task.test_serialization:{Sum.__qualname__}"] is Sum
    assert registered["tests.task.helpers:Sum"] is not Sum
    back = deserialize_task(json.loads(json.dumps(serialize_task(Sum(descriptor=SumRunner())))))
    assert type(back) is Sum and type(back.descriptor) is SumRunner


def test_a_true_collision_is_refused() -> None:
    """One module defining two different classes under one qualified name cannot be deserialized."""

    def define() -> type[UnitTask[Any, Any]]:
        class Twice(UnitTask[NumbersInput, SumOutput]):
            pass

        return Twice

    first = define()
    with pytest.raises(TaskRegistryError, match=r"two different unit task classes are named .*Twice"):
        define()
    assert UNIT_TASKS.lookup(ClassKey.of(first)) is first


def test_a_notebook_cell_run_again_replaces_its_class() -> None:
    """In `__main__` (a notebook or REPL) defining a task class again replaces it: that is how it is edited."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    source = (
        "from cornserve.task import TaskInput, TaskOutput, UnitTask\n"
        "class CellIn(TaskInput):\n    n: int = 0\n"
        "class CellOut(TaskOutput):\n    n: int\n"
        "class CellTask(UnitTask[CellIn, CellOut]):\n    pass\n"
    )
    exec(compile(source, "<cell>", "exec"), namespace)
    first = namespace["CellTask"]
    exec(compile(source, "<cell>", "exec"), namespace)
    second = namespace["CellTask"]
    assert first is not second
    assert UNIT_TASKS.lookup(ClassKey("__main__", "CellTask")) is second


def test_a_module_reloaded_in_place_replaces_its_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`importlib.reload` re-executes a module in the same module object: a redefinition, not a collision."""
    import importlib

    (tmp_path / "reloaded_tasks.py").write_text(
        "from cornserve.task import TaskInput, TaskOutput, UnitTask\n"
        "class RIn(TaskInput):\n    n: int = 0\n"
        "class ROut(TaskOutput):\n    n: int\n"
        "class Reloaded(UnitTask[RIn, ROut]):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloaded_tasks")
    first = module.Reloaded
    second = importlib.reload(module).Reloaded
    assert first is not second
    assert UNIT_TASKS.lookup(ClassKey("reloaded_tasks", "Reloaded")) is second


def test_a_new_library_version_replaces_its_classes() -> None:
    """A different module object of the same library (a new version) replaces the earlier class."""
    from cornserve.task.library import load_task_library

    source = (
        "from cornserve.task import TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask\n"
        "class In(TaskInput):\n    n: int = VERSION\n"
        "class Out(TaskOutput):\n    n: int\n"
        "class Versioned(UnitTask[In, Out]):\n    default_descriptor = 'VersionedDescriptor'\n"
        "class VersionedDescriptor(TaskExecutionDescriptor[Versioned]):\n    pass\n"
    )
    first = load_task_library("versioned-lib", source.replace("VERSION", "1")).module.Versioned
    second = load_task_library("versioned-lib", source.replace("VERSION", "2")).module.Versioned
    assert first is not second
    assert registered_unit_tasks()["versioned-lib:Versioned"] is second
    assert UNIT_TASKS.key_of(first) is None and UNIT_TASKS.key_of(second) == ClassKey(
        "versioned-lib", "Versioned"
    )


def test_invocations_share_one_rebuilt_task_per_wire_form() -> None:
    """The per-invocation parse rebuilds each distinct task once, and never hands out a replaced class."""
    from cornserve.task.library import load_task_library
    from cornserve.task.registry import deserialize_shared_task

    source = (
        "from cornserve.task import TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask\n"
        "class In(TaskInput):\n    n: int = VERSION\n"
        "class Out(TaskOutput):\n    n: int\n"
        "class Shared(UnitTask[In, Out]):\n    label: str = ''\n    default_descriptor = 'SharedDescriptor'\n"
        "class SharedDescriptor(TaskExecutionDescriptor[Shared]):\n    pass\n"
    )
    first_cls = load_task_library("shared-lib", source.replace("VERSION", "1")).module.Shared
    wire = json.loads(json.dumps(serialize_task(first_cls(label="a"))))
    one, two = deserialize_shared_task(wire), deserialize_shared_task(json.loads(json.dumps(wire)))
    assert one is two and type(one) is first_cls and one.label == "a"
    other = deserialize_shared_task({**wire, "config": {**wire["config"], "label": "b"}})
    assert other is not one and other.label == "b"
    invocations = INVOCATIONS.validate_python(
        [{"task": wire, "task_input": {"n": i}, "task_output": {"n": i}} for i in range(2)]
    )
    assert invocations[0].task is invocations[1].task is one
    assert [inv.task_input.n for inv in invocations] == [0, 1]  # inputs stay per invocation

    second_cls = load_task_library("shared-lib", source.replace("VERSION", "2")).module.Shared
    again = deserialize_shared_task(wire)
    assert type(again) is second_cls and again is not one  # the new version, not the cached old one

    bad = {**wire, "config": {**wire["config"], "label": 3}}
    for _ in range(2):  # a failure is not cached: it fails every time
        with pytest.raises(TaskSerializationError, match="invalid configuration"):
            deserialize_shared_task(bad)


def test_descriptor_must_match_task() -> None:
    with pytest.raises(TaskDefinitionError, match="EricDescriptor executes EncoderTask, not LLMTask"):
        LLMTask(model_id="m", descriptor=EricDescriptor())  # type: ignore[arg-type]


def test_descriptor_by_alias_and_positionally() -> None:
    by_alias = LLMTask(model_id="m", execution_descriptor=VLLMDescriptor())  # type: ignore[call-arg]
    assert isinstance(by_alias.descriptor, VLLMDescriptor)
    positional = EncoderTask(Modality.IMAGE, "m", 4, EricDescriptor(tensor_parallel_size=2))
    assert positional.model_id == "m" and positional.max_batch_size == 4
    assert positional.descriptor == EricDescriptor(tensor_parallel_size=2)
    assert isinstance(LLMTask(model_id="m").descriptor, CPULLMDescriptor)


def test_invocation_lists_round_trip_through_json() -> None:
    graph = Pipeline().trace(PipelineInput(values=[1.0, 2.0], factors=[2.0, 3.0]))
    payload = INVOCATIONS.dump_json(graph.invocations)
    back = INVOCATIONS.validate_json(payload)
    assert INVOCATIONS.dump_json(back) == payload
    assert [type(i.task) for i in back] == [type(i.task) for i in graph.invocations]
    assert [i.task.deployment_key for i in back] == [i.task.deployment_key for i in graph.invocations]
    # The Sum output placeholder has an unmaterialized field, and stays one.
    assert isinstance(back[-1].task_output.__dict__["total"], Unmaterialized)
    assert back[1].task_input.tensor.id == graph.invocations[0].task_output.tensor.id


def test_stream_invocations_round_trip() -> None:
    mllm = MLLMTask(model_id="m", modalities=[Modality.IMAGE])
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///x.png"}}]}
            ]
        }
    )
    graph = mllm.trace(request)
    back = INVOCATIONS.validate_json(INVOCATIONS.dump_json(graph.invocations))
    assert type(back[1].task_output).__name__ == "Stream[ChatCompletionChunk]"
    assert back[1].task_input.cornserve_embeddings[0].id == back[0].task_output.embeddings[0].id


def test_bad_invocation_json_is_a_clear_error() -> None:
    with pytest.raises(TaskSerializationError, match="invalid input for Sum"):
        INVOCATIONS.validate_python(
            [
                {
                    "task": serialize_task(HelperSum()),
                    "task_input": {"tensors": "nope"},
                    "task_output": {"total": 1.0},
                }
            ]
        )


def test_non_task_attribute_is_refused() -> None:
    class Sloppy(Pipeline):
        def post_init(self) -> None:
            super().post_init()
            self.threshold = 3

    with pytest.raises(TaskDefinitionError, match="only subtasks"):
        Sloppy()


def test_unit_task_must_not_override_invoke() -> None:
    with pytest.raises(TaskDefinitionError, match="must not override invoke"):

        class Bad(UnitTask[NumbersInput, SumOutput]):
            def invoke(self, task_input: NumbersInput) -> SumOutput:
                return SumOutput(total=0)


def test_the_same_source_executed_again_replaces_its_classes() -> None:
    """An app's source loaded twice is two module objects of one name: the later class wins, no error."""
    from cornserve.app import load_app

    source = (
        "from cornserve.task import TaskInput, TaskOutput, UnitTask\n"
        "class In(TaskInput):\n    pass\n"
        "class Out(TaskOutput):\n    pass\n"
        "class Inline(UnitTask[In, Out]):\n    pass\n"
    )
    first = load_app(source, "inline").Inline
    second = load_app(source, "inline").Inline
    assert first is not second and ClassKey.of(first) == ClassKey.of(second)
    assert UNIT_TASKS.key_of(second) == ClassKey.of(second) and UNIT_TASKS.key_of(first) is None
