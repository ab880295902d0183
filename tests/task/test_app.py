"""The app contract: validate_app accepts good apps and names the problem (and line) in bad ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cornserve.app import AppValidationError, trace_app, validate_app
from cornserve.task.builtins import ChatCompletionChunk, ChatCompletionRequest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mllm_app.py"

HEADER = """\
from collections.abc import AsyncIterator
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve.task.builtins import EncoderTask, LLMTask, MLLMTask, Modality

class Req(BaseModel):
    prompt: str

class Resp(BaseModel):
    text: str

"""
CONFIG = """
class Config(AppConfig):
    tasks = {"llm": LLMTask(model_id="m")}
"""


def app(body: str, config: str = CONFIG) -> str:
    return HEADER + textwrap.dedent(body) + config


def test_example_app_validates() -> None:
    spec = validate_app(EXAMPLE.read_text(), name="mllm_app")
    assert spec.streaming
    assert spec.request_model is ChatCompletionRequest and spec.response_model is ChatCompletionChunk
    assert spec.openai_models == ("mllm_app",)
    assert list(spec.tasks) == ["mllm"]
    assert sorted(t.display_name() for t in spec.unit_tasks) == ["EncoderTask[image]", "LLMTask[embeddings]"]
    described = spec.describe()
    assert described["streaming"] is True and "messages" in described["request_schema"]["properties"]


OPENAI_CONFIG = """
class Config(AppConfig):
    tasks = {"llm": LLMTask(model_id="m")}
    openai_chat = True
    openai_aliases = ("org/model-1",)
"""


def test_openai_chat_apps_declare_their_model_names_and_must_speak_chat_completions() -> None:
    chat = "from cornserve.task.builtins import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest\n"
    streaming = validate_app(
        app(
            chat + "async def serve(request: ChatCompletionRequest) -> AsyncIterator[ChatCompletionChunk]:\n"
            "    yield ChatCompletionChunk(id='x', created=0, model='m')\n",
            OPENAI_CONFIG,
        ),
        name="chat",
    )
    assert streaming.openai_models == ("chat", "org/model-1")
    unary = validate_app(
        app(
            chat + "async def serve(request: ChatCompletionRequest) -> ChatCompletion:\n"
            "    return ChatCompletion(id='x', created=0, model='m')\n",
            OPENAI_CONFIG,
        ),
        name="chat",
    )
    assert unary.openai_models == ("chat", "org/model-1") and not unary.streaming
    assert (
        validate_app(app("async def serve(request: Req) -> Resp:\n    return Resp(text='')\n")).openai_models
        == ()
    )
    with pytest.raises(AppValidationError, match="must take a ChatCompletionRequest, not Req"):
        validate_app(app("async def serve(request: Req) -> Resp:\n    return Resp(text='')\n", OPENAI_CONFIG))
    with pytest.raises(AppValidationError, match="must return a ChatCompletion, not Resp"):
        validate_app(
            app(
                chat + "async def serve(request: ChatCompletionRequest) -> Resp:\n    return Resp(text='')\n",
                OPENAI_CONFIG,
            )
        )
    bad_alias = OPENAI_CONFIG.replace('("org/model-1",)', '("has space",)')
    with pytest.raises(AppValidationError, match="openai_aliases must be a tuple of model names"):
        validate_app(app("async def serve(request: Req) -> Resp:\n    return Resp(text='')\n", bad_alias))


def test_non_streaming_and_async_generator_apps() -> None:
    spec = validate_app(app("async def serve(request: Req) -> Resp:\n    return Resp(text=request.prompt)\n"))
    assert not spec.streaming
    gen = validate_app(
        app("async def serve(request: Req) -> AsyncIterator[Resp]:\n    yield Resp(text='a')\n")
    )
    assert gen.streaming


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        (
            HEADER + "def serve(request: Req) -> Resp:\n    ...\n" + CONFIG,
            r"line 12: `serve` must be an async function",
        ),
        (HEADER + CONFIG, r"the app defines no `serve` function"),
        (
            app("async def serve(a: Req, b: Req) -> Resp:\n    ...\n"),
            r"line 12: `serve` must take exactly one request parameter, it takes 2",
        ),
        (app("async def serve() -> Resp:\n    ...\n"), r"exactly one request parameter, it takes 0"),
        (
            app("async def serve(request) -> Resp:\n    ...\n"),
            r"request parameter `request` of `serve` must be annotated with a pydantic model \(got no annotation\)",
        ),
        (
            app("async def serve(request: dict) -> Resp:\n    ...\n"),
            r"must be annotated with a pydantic model \(got <class 'dict'>\)",
        ),
        (app("async def serve(request: Req):\n    ...\n"), r"`serve` must annotate its return type"),
        (
            app("async def serve(request: Req) -> str:\n    ...\n"),
            r"`serve` must return a pydantic model or AsyncIterator\[Model\]",
        ),
        (
            app("async def serve(request: Req) -> AsyncIterator[str]:\n    yield 'x'\n"),
            r"its items must be a pydantic model",
        ),
        (
            app("async def serve(request: Req) -> Resp:\n    yield Resp(text='x')\n"),
            r"`serve` yields, so its return annotation must be AsyncIterator",
        ),
        (app("async def serve(request: Req) -> Resp:\n    ...\n", config=""), r"the app defines no config"),
        (
            app(
                "async def serve(request: Req) -> Resp:\n    ...\n",
                config=CONFIG + "\nclass Other(AppConfig):\n    tasks = {}\n",
            ),
            r"defines 2 AppConfig subclasses \(Config, Other\)",
        ),
        (
            app(
                "async def serve(request: Req) -> Resp:\n    ...\n",
                config="\nclass Config(AppConfig):\n    tasks = {}\n",
            ),
            r"line 15: Config.tasks must be a non-empty dict",
        ),
        (
            app(
                "async def serve(request: Req) -> Resp:\n    ...\n",
                config="\nclass Config(AppConfig):\n    tasks = {'x': 3}\n",
            ),
            r"Config.tasks\['x'\] must be a Task instance, got int",
        ),
        (
            app(
                "async def serve(request: Req) -> Resp:\n    ...\n",
                config="\nclass Config(AppConfig):\n    tasks = {'llm': LLMTask(model_id='m')}\n    max_queue = -1\n",
            ),
            r"Config.max_queue must be None or an integer >= 0, got -1",
        ),
        (
            app(
                "async def serve(request: Req) -> Resp:\n    ...\n",
                config="\nclass Config(AppConfig):\n    tasks = {'llm': LLMTask(model_id='m')}\n    max_concurrency = '2'\n",
            ),
            r"Config.max_concurrency must be None or an integer >= 0, got '2'",
        ),
        (HEADER + "async def serve(request: Req) -> Resp\n    ...\n", r"line 12: syntax error"),
        (HEADER + "x = 1\nMLLMTask(model_id='')\n", r"line 13: executing the app raised ValidationError"),
        (HEADER + "import no_such_module_here\n", r"line 12: executing the app raised ModuleNotFoundError"),
    ],
)
def test_invalid_apps_are_explained(source: str, pattern: str) -> None:
    with pytest.raises(AppValidationError, match=pattern):
        validate_app(source)


def chat_request(prompt: str, *image_urls: str) -> dict[str, Any]:
    """What the example app takes: an OpenAI chat request with the images, then the question."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]}


async def test_trace_app_records_the_graph_of_a_request() -> None:
    spec = validate_app(EXAMPLE.read_text())
    graphs = await trace_app(spec, chat_request("hi", "file:///a.png", "file:///b.png"))
    (graph,) = graphs
    assert [inv.task.display_name() for inv in graph.invocations] == [
        "EncoderTask[image]",
        "LLMTask[embeddings]",
    ]
    assert len(graph.edges) == 2
    text_only = await trace_app(spec, chat_request("hi"))
    assert [inv.task.display_name() for inv in text_only[0].invocations] == ["LLMTask[embeddings]"]


def test_cli_trace_prints_the_graph() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", "trace", str(EXAMPLE), "--request", json.dumps(chat_request("hi", "file:///a.png"))],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (
        "flowchart LR" in out.stdout
        and "EncoderTask[image]" in out.stdout
        and "-.->|stream| out" in out.stdout
    )


def test_cli_trace_reports_errors() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", "trace", str(EXAMPLE), "--request", '{"messages": []}'],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and "List should have at least 1 item" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", "trace", "/nonexistent/app.py", "--request", "{}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and "cannot read" in missing.stderr
