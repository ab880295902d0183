"""The OpenAI-compatible routes' shapes without a cluster: error bodies, statuses, chunk ↔ completion.

(The official client against a live cluster is tests/e2e/test_openai.py.)
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from cornserve.bus.gateway_api import OpenAIErrorBody
from cornserve.gateway.admission import Admission, AdmissionLimits
from cornserve.gateway.apps import AppRegistry
from cornserve.gateway.auth import Credentials
from cornserve.gateway.errors import HTTPError
from cornserve.gateway.openai_compat import OpenAIFront
from cornserve.gateway.routes import Gateway
from cornserve.task.builtins import ChatCompletion, ChatCompletionChunk, ChoiceDelta, ChunkChoice, Usage

TOKEN = "t" * 32


def _chunk(
    content: str | None = None, finish: str | None = None, usage: Usage | None = None
) -> ChatCompletionChunk:
    choices = [] if usage else [ChunkChoice(delta=ChoiceDelta(content=content), finish_reason=finish)]
    return ChatCompletionChunk(id="c1", created=7, model="m", choices=choices, usage=usage)


def test_chunks_add_up_to_a_completion_and_back() -> None:
    usage = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
    chunks = [_chunk(""), _chunk("Hel"), _chunk("lo"), _chunk(None, "length"), _chunk(usage=usage)]
    completion = ChatCompletion.from_chunks(chunks)
    assert (
        completion.choices[0].message.content == "Hello" and completion.choices[0].finish_reason == "length"
    )
    assert completion.usage == usage and (completion.id, completion.created) == ("c1", 7)
    again = ChatCompletion.from_chunks(completion.to_chunks())
    assert again.model_dump() == completion.model_dump()
    assert completion.to_chunks()[-1].choices == [] and completion.to_chunks()[-1].usage == usage


def test_errors_in_openais_shape_map_statuses_types_and_params() -> None:
    invalid = HTTPError(422, "validation_error", "1 validation error(s)", [{"loc": ["messages"], "msg": "x"}])
    body = OpenAIErrorBody.model_validate(invalid.openai_body())
    assert invalid.openai_status() == 400
    assert (body.error.type, body.error.param, body.error.code) == (
        "invalid_request_error",
        "messages",
        "validation_error",
    )
    assert HTTPError(429, "overloaded", "full").openai_body()["error"]["type"] == "rate_limit_error"
    assert HTTPError(401, "unauthorized", "no").openai_body()["error"]["type"] == "authentication_error"
    assert HTTPError(502, "executor_failed", "boom").openai_body()["error"]["type"] == "server_error"
    assert (
        HTTPError(404, "model_not_found", "no", {"param": "model"}).openai_body()["error"]["param"] == "model"
    )


async def _call(
    client: TestClient[Any, Any], method: str, path: str, token: str | None, body: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with client.request(method, path, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_the_v1_routes_answer_openai_shaped_errors_before_touching_any_app() -> None:
    gateway = Gateway.__new__(Gateway)  # no bus: the refusals below come before any app is looked up
    no_bus: Any = None
    gateway.openai = OpenAIFront(AppRegistry(no_bus, no_bus), Admission(AdmissionLimits(), 60.0), 60.0)
    app = gateway.app(Credentials.from_tokens(TOKEN))
    async with TestClient(TestServer(app)) as client:
        cases = [
            ("POST", "/v1/chat/completions", None, {}, 401, "unauthorized", None),
            ("GET", "/v1/models", "x" * 40, None, 401, "unauthorized", None),
            ("GET", "/v1/no-such-route", TOKEN, None, 404, "not_found", None),
            ("POST", "/v1/chat/completions", TOKEN, [1], 400, "invalid_request", None),
            ("POST", "/v1/chat/completions", TOKEN, {"messages": []}, 400, "invalid_request", "model"),
            ("POST", "/v1/chat/completions", TOKEN, {"model": "nope", "messages": []}, 404, "model_not_found", "model"),
        ]  # fmt: skip
        for method, path, token, body, status, code, param in cases:
            got, reply = await _call(client, method, path, token, body)
            assert got == status, (path, reply)
            error = OpenAIErrorBody.model_validate(reply).error
            assert (error.code, error.param) == (code, param), reply
        # The Cornserve routes keep their own shape.
        got, reply = await _call(client, "GET", "/tasks", None, None)
        assert got == 401 and reply["error"] == "unauthorized"
