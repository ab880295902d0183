"""The Arena and Chain examples (issue 16) validate and trace to the graphs docs/tasks.md shows.

Tracing executes nothing: an `LLMCompletionTask` answers a trace with a completion that says it
was traced (`traced_output`), so the Chain's second graph, built from the first one's text, is
traced too. Where `serve` reads a value output with no stand-in, tracing stops, says so in the last
graph's note, and keeps every graph recorded until then. A rule broken while recording is still an
error.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from cornserve.app import trace_app, validate_app
from cornserve.task import StaticGraphError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IMAGE = "data:image/png;base64,iVBORw0KGgo="


async def test_arena_is_one_encoder_broadcast_to_every_llm() -> None:
    spec = validate_app((EXAMPLES / "arena_app.py").read_text(), name="arena")
    assert not spec.streaming
    names = sorted(t.display_name() for t in spec.unit_tasks)
    assert names == ["EncoderTask[image]", "LLMCompletionTask[embeddings]", "LLMCompletionTask[embeddings]"]
    (graph,) = await trace_app(spec, {"image_url": IMAGE})
    assert [inv.task.display_name() for inv in graph.invocations] == [
        "EncoderTask[image]",
        "LLMCompletionTask[embeddings]",
        "LLMCompletionTask[embeddings]",
    ]
    (first, second) = graph.edges
    assert (first[0], first[1], second[0], second[1]) == (0, 1, 0, 2) and first[2] == second[2]
    assert graph.note == ""


async def test_chain_traces_both_graphs() -> None:
    spec = validate_app((EXAMPLES / "chain_app.py").read_text(), name="chain")
    assert spec.streaming
    describe, rewrite = await trace_app(spec, {"image_url": IMAGE})
    assert [inv.task.display_name() for inv in describe.invocations] == [
        "EncoderTask[image]",
        "LLMCompletionTask[embeddings]",
    ]
    (inv,) = rewrite.invocations
    assert inv.task.display_name() == "LLMTask" and rewrite.stream_position() == 0
    # The second graph's prompt carries the first one's traced answer.
    assert "traced, not generated" in inv.task_input.messages[0].content
    assert describe.note == rewrite.note == ""


READS_A_VALUE = """
from typing import Any
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve.task import ExecutorRequest, TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask


class Question(TaskInput):
    text: str


class Score(TaskOutput):
    value: float


class Grade(UnitTask[Question, Score]):
    default_descriptor = "GradeDescriptor"


class GradeDescriptor(TaskExecutionDescriptor[Grade]):
    def to_request(self, task: Any, invocation: Any) -> ExecutorRequest:
        return ExecutorRequest(path="/grade", body={})

    def from_response(self, task: Any, invocation: Any, body: Any) -> Score:
        return Score.model_validate(body)


grade = Grade()


class Config(AppConfig):
    tasks = {"grade": grade}


class Req(BaseModel):
    text: str


class Resp(BaseModel):
    value: float


async def serve(request: Req) -> Resp:
    first = await grade(Question(text=request.text))
    again = await grade(Question(text=f"{first.value:.1f}"))
    return Resp(value=again.value)
"""


async def test_tracing_stops_with_a_note_where_serve_reads_a_value_without_a_stand_in() -> None:
    spec = validate_app(READS_A_VALUE, name="reads")
    (graph,) = await trace_app(spec, {"text": "hi"})
    assert [inv.task.display_name() for inv in graph.invocations] == ["Grade"]
    assert graph.note.startswith(
        "tracing stopped after this graph: serve() used output field 'value' of Grade"
    )
    assert "%% tracing stopped" in graph.to_mermaid() and "// tracing stopped" in graph.to_dot()
    assert "note: tracing stopped" in graph.describe()


BROKEN = """
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve.task import Task
from cornserve.task.builtins import ChatCompletion, ChatCompletionRequest, LLMCompletionTask, LLMTask

first = LLMCompletionTask(model_id="a")
streaming = LLMTask(model_id="b")


class TwoStreams(Task[ChatCompletionRequest, ChatCompletion]):
    def post_init(self) -> None:
        self.llm = LLMTask(model_id="b")

    def invoke(self, request):
        self.llm.invoke(request)
        return first.invoke(request)


class Config(AppConfig):
    tasks = {"first": first, "broken": TwoStreams()}


class Req(BaseModel):
    prompt: str


class Resp(BaseModel):
    text: str


async def serve(request: Req) -> Resp:
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": request.prompt}])
    await first(chat)
    await Config.tasks["broken"](chat)
    return Resp(text="")
"""


async def test_a_rule_broken_in_a_later_graph_is_still_an_error() -> None:
    spec = validate_app(textwrap.dedent(BROKEN), name="broken")
    with pytest.raises(
        StaticGraphError, match="LLMTask at position 0 produces a Stream that is not the graph's result"
    ):
        await trace_app(spec, {"prompt": "hi"})
