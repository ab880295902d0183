"""Graph export and forward wiring."""

from __future__ import annotations

from tests.task.helpers import Chat, NumbersInput, Pipeline, PipelineInput

from cornserve.task import forward_edges, wire_forwards


def test_edges_and_pictures() -> None:
    graph = Pipeline().trace(PipelineInput(values=[1.0], factors=[2.0, 3.0]))
    make, s1, s2, _ = graph.invocations
    fwd = make.task_output.tensor.id
    assert graph.edges == [
        (0, 1, fwd),
        (0, 2, fwd),
        (1, 3, s1.task_output.tensor.id),
        (2, 3, s2.task_output.tensor.id),
    ]
    assert forward_edges(graph.invocations) == graph.edges
    mermaid = graph.to_mermaid()
    assert mermaid.startswith("flowchart LR\n")
    assert '    t0["0: MakeTensor"]' in mermaid and f"    t0 -->|Tensor {fwd[:8]}| t1" in mermaid
    dot = graph.to_dot()
    assert dot.startswith("digraph task_graph {") and dot.rstrip().endswith("}")
    assert f't0 -> t2 [label="Tensor {fwd[:8]}"];' in dot
    assert "[3] Sum  key=sum-" in graph.describe()


def test_stream_output_is_drawn() -> None:
    graph = Chat().trace(NumbersInput(values=[1.0]))
    assert "t1 -.->|stream| out" in graph.to_mermaid()
    assert 't1 -> out [label="stream", style=dashed];' in graph.to_dot()


def test_wire_forwards_broadcasts_to_every_consumer_group() -> None:
    graph = Pipeline().trace(PipelineInput(values=[1.0], factors=[2.0, 3.0]))
    wire_forwards(graph.invocations, [[0], [1, 2], [1, 2], [5]])
    make, s1, _, total = graph.invocations
    assert make.task_output.tensor.src_sidecar_ranks == [0]
    assert make.task_output.tensor.dst_sidecar_ranks == [
        [1, 2]
    ]  # one group, consumed twice by the same executor
    assert s1.task_input.tensor.dst_sidecar_ranks == [[1, 2]]
    assert total.task_input.tensors[0].src_sidecar_ranks == [1, 2]
    assert total.task_input.tensors[1].dst_sidecar_ranks == [[5]]
    wire_forwards(graph.invocations, [[0], [1], [2], [5]])
    assert make.task_output.tensor.dst_sidecar_ranks == [[1], [2]]
