"""The recorded task graph: invocations, forward edges, wiring, and pictures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cornserve.task.forward import DataForward, iter_forwards
from cornserve.task.invocation import TaskInvocation
from cornserve.task.nested import nested_values
from cornserve.task.stream import Stream, is_stream_forward


def forward_edges(invocations: Sequence[TaskInvocation]) -> list[tuple[int, int, str]]:
    """`(producer index, consumer index, forward id)` for every forward reused in a later input."""
    producers: dict[str, int] = {}
    edges: list[tuple[int, int, str]] = []
    for position, inv in enumerate(invocations):
        for fwd in iter_forwards(inv.task_input):
            if fwd.id in producers:
                edges.append((producers[fwd.id], position, fwd.id))
        for fwd in iter_forwards(inv.task_output):
            producers[fwd.id] = position
    return edges


def wire_forwards(invocations: Sequence[TaskInvocation], ranks: Sequence[list[int]]) -> None:
    """Fill every forward's sidecar ranks from the ranks of the executor chosen for each invocation.

    `ranks[i]` are the sidecar ranks of invocation i's executor. A forward's source is its
    producer's ranks; its destinations are one rank group per consuming invocation (broadcast).
    Every copy of a forward with the same id (producer output, consumer inputs) is updated, so
    this also works on invocations that went through JSON.
    """
    if len(ranks) != len(invocations):
        raise ValueError(f"{len(ranks)} rank lists for {len(invocations)} invocations")
    src: dict[str, list[int]] = {}
    dst: dict[str, list[list[int]]] = {}
    for position, inv in enumerate(invocations):
        for fwd in iter_forwards(inv.task_output):
            src[fwd.id] = list(ranks[position])
            dst.setdefault(fwd.id, [])
    for position, inv in enumerate(invocations):
        for fwd in iter_forwards(inv.task_input):
            group = list(ranks[position])
            if fwd.id in dst and group not in dst[fwd.id]:
                dst[fwd.id].append(group)
    for inv in invocations:
        for fwd in [*iter_forwards(inv.task_input), *iter_forwards(inv.task_output)]:
            if fwd.id in src:
                fwd.src_sidecar_ranks = src[fwd.id]
                fwd.dst_sidecar_ranks = dst[fwd.id]


def _label(inv: TaskInvocation) -> str:
    task = inv.task
    detail = getattr(task, "model_id", None) or getattr(task, "modality", None)
    return f"{task.display_name()}" + (f" ({detail})" if detail else "")


@dataclass
class TaskGraph:
    """A recorded graph: invocations in call order, and the forward edges between them.

    In the pictures a dashed arrow is a stream: a stream forward (`DataForward[Stream[T]]`) between
    two tasks, or the streamed result going to the caller (`output`).
    """

    invocations: list[TaskInvocation]
    output: Any = None
    note: str = ""
    """Said with the picture (e.g. that tracing stopped after this graph: `cornserve.app.trace_app`)."""
    edges: list[tuple[int, int, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.edges = forward_edges(self.invocations)

    def _returned(self) -> tuple[list[tuple[int, str]], bool]:
        """Forwards the graph returns (producer, id), and whether its output streams."""
        returned_ids = {f.id for f in iter_forwards(self.output)}
        found = [
            (position, fwd.id)
            for position, inv in enumerate(self.invocations)
            for fwd in iter_forwards(inv.task_output)
            if fwd.id in returned_ids
        ]
        return found, self.stream_position() is not None

    def _data_type(self, fid: str) -> str:
        for inv in self.invocations:
            for fwd in iter_forwards(inv.task_output):
                if fwd.id == fid:
                    return fwd.data_type
        return "?"

    def _streams(self, fid: str) -> bool:
        return any(
            fwd.id == fid and is_stream_forward(fwd)
            for inv in self.invocations
            for fwd in iter_forwards(inv.task_output)
        )

    def stream_position(self) -> int | None:
        """The invocation whose streamed output is the graph's result (None if it does not stream)."""
        streams = [
            leaf
            for leaf in nested_values(self.output, opaque=(DataForward, Stream))
            if isinstance(leaf, Stream)
        ]
        if not streams:
            return None
        if streams[0].handle.position is not None:
            return streams[0].handle.position
        found = [i for i, inv in enumerate(self.invocations) if isinstance(inv.task_output, Stream)]
        return found[-1] if found else None

    def _picture(self) -> tuple[list[tuple[str, str]], list[tuple[str, str, str, bool]]]:
        """The drawing both renderers share: nodes (id, label) and arrows (src, dst, label, dashed)."""
        nodes = [
            (f"t{position}", f"{position}: {_label(inv)}") for position, inv in enumerate(self.invocations)
        ]
        arrows = [
            (f"t{producer}", f"t{consumer}", f"{self._data_type(fid)} {fid[:8]}", self._streams(fid))
            for producer, consumer, fid in self.edges
        ]
        returned, streams = self._returned()
        if returned or streams:
            nodes.append(("out", "output"))
        arrows += [
            (f"t{producer}", "out", f"{self._data_type(fid)} {fid[:8]}", False) for producer, fid in returned
        ]
        position = self.stream_position()
        if streams and position is not None:
            arrows.append((f"t{position}", "out", "stream", True))
        return nodes, arrows

    def to_mermaid(self) -> str:
        """Mermaid flowchart text: one node per invocation, one arrow per forward edge."""
        nodes, arrows = self._picture()
        lines = ["flowchart LR"]
        lines += [f'    {n}(["{label}"])' if n == "out" else f'    {n}["{label}"]' for n, label in nodes]
        lines += [f"    {a} {'-.->' if dashed else '-->'}|{label}| {b}" for a, b, label, dashed in arrows]
        lines += [f"    %% {line}" for line in self.note.splitlines()]
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        """Graphviz DOT text of the same picture."""
        nodes, arrows = self._picture()
        lines = ["digraph task_graph {", "    rankdir=LR;", "    node [shape=box];"]
        lines += [
            f'    {n} [label="{label}", shape=oval];' if n == "out" else f'    {n} [label="{label}"];'
            for n, label in nodes
        ]
        lines += [
            f'    {a} -> {b} [label="{label}", style=dashed];'
            if dashed
            else f'    {a} -> {b} [label="{label}"];'
            for a, b, label, dashed in arrows
        ]
        lines += [f"    // {line}" for line in self.note.splitlines()]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        """A plain-text listing: each invocation with the forwards it consumes and produces."""
        lines = []
        for position, inv in enumerate(self.invocations):
            consumes = [_short(f) for f in iter_forwards(inv.task_input)]
            produces = [_short(f) for f in iter_forwards(inv.task_output)]
            kind = "output streams" if isinstance(inv.task_output, Stream) else "output is a value"
            lines.append(
                f"[{position}] {_label(inv)}  key={inv.task.deployment_key}\n"
                f"      consumes: {', '.join(consumes) or '-'}   produces: {', '.join(produces) or '-'} ({kind})"
            )
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines) + "\n"


def _short(fwd: DataForward[Any]) -> str:
    """A forward in listings: its id's start, marked when it is a stream forward."""
    return f"{fwd.id[:8]} (stream)" if is_stream_forward(fwd) else fwd.id[:8]


def all_forwards(invocations: Sequence[TaskInvocation]) -> dict[str, DataForward[Any]]:
    """Every forward produced in a graph, by id."""
    return {f.id: f for inv in invocations for f in iter_forwards(inv.task_output)}
