"""The Arena and Chain examples (issue 16) validate and trace to the graphs docs/tasks.md shows.

Tracing executes nothing: where `serve` reads a value output (the text of a completion) tracing
stops, says so in the last graph's note, and keeps every graph recorded until then. A rule broken
while recording is still an error.
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
    assert "tracing stopped after this graph" in graph.note and "'choices'" in graph.note
    assert "%% tracing stopped" in graph.to_mermaid()


async def test_chain_traces_its_first_graph_and_says_where_it_stopped() -> None:
    spec = validate_app((EXAMPLES / "chain_app.py").read_text(), name="chain")
    assert spec.streaming
    (graph,) = await trace_app(spec, {"image_url": IMAGE})
    assert [inv.task.display_name() for inv in graph.invocations] == [
        "EncoderTask[image]",
        "LLMCompletionTask[embeddings]",
    ]
    assert "LLMCompletionTask[embeddings], which only exists when the graph really runs" in graph.note


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
