"""PythonExecutorDescriptor on its own: launch spec, requests, responses and stream lines."""

from __future__ import annotations

import json
import sys
from types import ModuleType
from typing import Any

import pytest

from cornserve.executor import PythonExecutorDescriptor, stream_item_type
from cornserve.task import (
    DataForward,
    Device,
    ExecutorPlacement,
    Stream,
    TaskDefinitionError,
    TaskExecutionError,
    TaskInvocation,
    deserialize_task,
    serialize_task,
    wire_forwards,
)


def test_launch_spec(tensor_math: ModuleType) -> None:
    task = tensor_math.MatMul()
    placement = ExecutorPlacement(
        executor_id="mm-1",
        host="127.0.0.1",
        port=8123,
        devices=[Device(kind="cpu", index=0), Device(kind="cpu", index=1)],
        sidecar_ranks=[0, 1],
        nats_url="nats://127.0.0.1:4222",
    )
    spec = task.descriptor.launch_spec(task, placement)
    assert spec.command[:3] == [sys.executable, "-m", "cornserve.executor"]
    args = dict(zip(spec.command[3::2], spec.command[4::2], strict=True))
    assert deserialize_task(json.loads(args["--task-json"])) == task
    assert args["--executor-id"] == "mm-1" and args["--host"] == "127.0.0.1" and args["--port"] == "8123"
    assert args["--sidecar-ranks"] == "0,1" and args["--nats-url"] == "nats://127.0.0.1:4222"
    assert spec.port == 8123 and spec.health_path == "/health"
    assert spec.env["OMP_NUM_THREADS"] == "2" and spec.env["CORNSERVE_NATS_URL"] == "nats://127.0.0.1:4222"


def test_descriptor_is_registered_and_round_trips(tensor_math: ModuleType) -> None:
    task = tensor_math.Reduce(descriptor=tensor_math.ReduceExecutor(sidecar_timeout_s=5.0))
    data = serialize_task(task)
    assert data["config"]["descriptor"]["name"] == "tensor-math:ReduceExecutor"
    again = deserialize_task(data)
    assert again == task and again.descriptor.sidecar_timeout_s == 5.0
    assert again.deployment_key != tensor_math.Reduce().deployment_key
    assert tensor_math.ReduceExecutor.task_cls() is tensor_math.Reduce
    with pytest.raises(TaskDefinitionError, match="executes MatMul, not Reduce"):
        tensor_math.Reduce(descriptor=tensor_math.MatMulExecutor())


def test_resolve_handler(tensor_math: ModuleType) -> None:
    task = tensor_math.Reduce()
    assert task.descriptor.resolve_handler(task) is tensor_math.reduce
    broken = tensor_math.Reduce(descriptor=tensor_math.ReduceExecutor(handler="missing"))
    with pytest.raises(TaskDefinitionError, match="defines no function of that name"):
        broken.descriptor.resolve_handler(broken)


def traced(tensor_math: ModuleType) -> Any:
    """A two-invocation graph (MakeMatrix → Reduce), wired to ranks [1] and [2]."""
    make, reduce = tensor_math.MakeMatrix(), tensor_math.Reduce()
    out = make.make_output_placeholder(tensor_math.MakeMatrixInput(seed=1, rows=2, cols=2))
    invs = [
        TaskInvocation(
            task=make, task_input=tensor_math.MakeMatrixInput(seed=1, rows=2, cols=2), task_output=out
        ),
        TaskInvocation(
            task=reduce,
            task_input=tensor_math.ReduceInput(x=out.matrix),
            task_output=reduce.make_output_placeholder(tensor_math.ReduceInput(x=out.matrix)),
        ),
    ]
    wire_forwards(invs, [[1], [2]])
    return invs


def test_to_request_and_from_response(tensor_math: ModuleType) -> None:
    make_inv, reduce_inv = traced(tensor_math)
    make = make_inv.task
    req = make.descriptor.to_request(make, make_inv)
    assert req.method == "POST" and req.path == "/invoke" and not req.stream
    assert req.body == make_inv.model_dump(mode="json")
    assert req.body["task_output"]["matrix"]["dst_sidecar_ranks"] == [[2]]

    # The executor echoes its forwards; the parsed output carries the wired ranks.
    body = {
        "matrix": {**req.body["task_output"]["matrix"], "src_sidecar_ranks": None, "dst_sidecar_ranks": None}
    }
    out = make.descriptor.from_response(make, make_inv, body)
    assert out.matrix.id == make_inv.task_output.matrix.id
    assert out.matrix.src_sidecar_ranks == [1] and out.matrix.dst_sidecar_ranks == [[2]]

    stranger = {"matrix": DataForward[Any]().model_dump(mode="json")}
    with pytest.raises(TaskExecutionError, match="returned forwards"):
        make.descriptor.from_response(make, make_inv, stranger)
    with pytest.raises(TaskExecutionError, match="not a JSON object"):
        make.descriptor.from_response(make, make_inv, [1])

    reduce = reduce_inv.task
    got = reduce.descriptor.from_response(
        reduce, reduce_inv, {"sum": 1.5, "mean": 0.5, "max": 1.0, "shape": [3]}
    )
    assert got == tensor_math.ReduceOutput(sum=1.5, mean=0.5, max=1.0, shape=[3])
    with pytest.raises(TaskExecutionError, match="invalid output"):
        reduce.descriptor.from_response(reduce, reduce_inv, {"sum": "lots"})


def test_stream_lines(tensor_math: ModuleType) -> None:
    task = tensor_math.RowSums()
    x = tensor_math.RowSumsInput(x=DataForward[Any]())
    inv = TaskInvocation(task=task, task_input=x, task_output=task.make_output_placeholder(x))
    assert stream_item_type(task.output_cls()) is tensor_math.RowSum
    assert stream_item_type(tensor_math.ReduceOutput) is None
    d: PythonExecutorDescriptor[Any] = task.descriptor
    assert d.to_request(task, inv).stream
    assert d.from_stream_line(task, inv, "  \n") is None
    assert d.from_stream_line(task, inv, '{"index": 3, "sum": 2.5}\n') == tensor_math.RowSum(index=3, sum=2.5)
    with pytest.raises(TaskExecutionError, match=r"^ValueError: boom$"):
        d.from_stream_line(task, inv, '{"error": "ValueError: boom"}')
    with pytest.raises(TaskExecutionError, match="invalid item"):
        d.from_stream_line(task, inv, '{"index": "x"}')
    with pytest.raises(TaskExecutionError, match="not JSON"):
        d.from_stream_line(task, inv, "{oops")
    # The relay's path (the default goes through from_stream_line): the item's JSON, or the same errors.
    assert json.loads(d.stream_item_json(task, inv, '{"index": 3, "sum": 2.5}\n') or b"") == {
        "index": 3,
        "sum": 2.5,
    }
    assert d.stream_item_json(task, inv, "  \n") is None
    with pytest.raises(TaskExecutionError, match="invalid item"):
        d.stream_item_json(task, inv, '{"index": "x"}')
    with pytest.raises(TaskExecutionError, match="streams its output"):
        d.from_response(task, inv, {})
    assert isinstance(inv.task_output, Stream)
