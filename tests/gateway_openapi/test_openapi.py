"""The gateway's OpenAPI document is usable as written: every `$ref` resolves and a client tool loads it.

(And the fuzzer of tests/control/test_fuzz.py, which reads it, reports what it must: checked here
against a stand-in server, since the real gateway gives it nothing to report.)

An app's request model that nests another model used to leave a `$ref` to a component the document
did not have (pydantic keeps nested models in the schema's own `$defs`), so a generated client or a
fuzzer could not resolve the invoke route's body.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from tests.control import fuzzing

from cornserve.app import validate_app
from cornserve.bus.control import AppRecord
from cornserve.bus.gateway_api import AppSummary
from cornserve.gateway.apps import App
from cornserve.gateway.auth import ROUTE_SCOPES, Credentials
from cornserve.gateway.openapi import openapi_document
from cornserve.gateway.routes import Gateway

NESTED_APP = """
from pydantic import BaseModel, Field
from cornserve.app import AppConfig
from cornserve.task.builtins import CPULLMDescriptor, LLMTask

llm = LLMTask(model_id="org/model", descriptor=CPULLMDescriptor())

class Config(AppConfig):
    tasks = {"llm": llm}

class Shape(BaseModel):
    rows: int = Field(ge=1, le=8)

class Request(BaseModel):
    shape: Shape
    shapes: list[Shape] = []

class Response(BaseModel):
    shape: Shape

async def serve(request: Request) -> Response:
    return Response(shape=request.shape)
"""


def _app(name: str) -> App:
    record = AppRecord(name=name, source=NESTED_APP, state="ready", created_at=1.0)
    return App(record, validate_app(NESTED_APP, name))


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [*([node["$ref"]] if "$ref" in node else []), *(r for v in node.values() for r in _refs(v))]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_ref_resolves_and_nested_models_are_components() -> None:
    doc = openapi_document([_app("one"), _app("two")])
    refs = _refs(doc)
    assert "#/components/schemas/one.Shape" in refs and "#/components/schemas/two.Shape" in refs
    for ref in refs:
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]
    assert "$defs" not in str(doc)


def test_routes_declare_their_parameters_and_the_bearer_scheme() -> None:
    doc = openapi_document([])
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["paths"]["/health"]["get"]["security"] == []
    for path, item in doc["paths"].items():
        declared = {p["name"] for p in item.get("parameters", [])}
        assert declared == {part[1:-1] for part in path.split("/") if part.startswith("{")}, path
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            assert all("description" in r for r in responses.values()), (method, path)
            scope = ROUTE_SCOPES[(method.upper(), path)]
            assert ("401" in responses) == (scope != "open"), (method, path)
            assert ("403" in responses) == (scope == "admin"), (method, path)


def test_a_fuzzer_draws_nested_bodies_for_an_invoke_route() -> None:
    schema = schemathesis.openapi.from_dict(openapi_document([_app("nested")]))
    operations = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    invoke = operations["POST /apps/nested/invoke"]
    bodies: list[Any] = []

    @settings(max_examples=10, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=invoke.as_strategy())
    def draw(case: Case) -> None:
        bodies.append(case.body)

    draw()
    assert bodies and all(1 <= body["shape"]["rows"] <= 8 for body in bodies)


class _Stub(http.server.BaseHTTPRequestHandler):
    """A gateway stand-in: serves the real document, answers 500 on POST /tasklibs, never answers POST /apps."""

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(200, openapi_document([]) if self.path == "/openapi.json" else [])

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/apps":
            time.sleep(3)  # past the fuzzer's per-request deadline below
        self._reply(500 if self.path == "/tasklibs" else 418, {"error": "x", "message": "y"})

    def log_message(self, *args: Any) -> None:
        pass


def test_the_fuzzer_reports_server_errors_hangs_and_undocumented_statuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fuzzing, "REQUEST_TIMEOUT_S", 1.0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        fuzzer = fuzzing.GatewayFuzzer(url, fuzzing.load_schema(url, "token"), seed=1)
        ops = {op.label: op for op in fuzzer.operations()}
        for label in ("POST /tasklibs", "POST /apps", "POST /sessions", "GET /tasks"):
            fuzzer.fuzz(ops[label], 2, headers={}, modes=(GenerationMode.POSITIVE,))
    finally:
        server.shutdown()
        server.server_close()
    stats = fuzzer.stats
    assert stats.server_errors and all(e.startswith("POST /tasklibs -> 500") for e in stats.server_errors)
    assert stats.no_answer and all(e.startswith("POST /apps:") for e in stats.no_answer)
    assert any(e.startswith("POST /sessions -> 418") for e in stats.undocumented)  # 200 on GET is listed
    assert not any(e.startswith("GET /tasks") for e in stats.undocumented)
    assert stats.statuses[200] >= 1 and "curl" in stats.server_errors[0]


def test_the_document_lists_exactly_the_routes_the_gateway_serves_each_with_a_scope() -> None:
    app = Gateway.__new__(Gateway).app(Credentials.from_tokens("t" * 32))
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    doc = openapi_document([])
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    assert documented == served == set(ROUTE_SCOPES)
    assert ("POST", "/v1/chat/completions") in served and ("GET", "/v1/models") in served


def test_every_body_is_a_generated_model_schema() -> None:
    """No hand-written body schema: each fixed route's bodies are `$ref`s to the models' generated schemas."""
    doc = openapi_document([])
    schemas = doc["components"]["schemas"]
    generated = AppSummary.model_json_schema(
        mode="serialization", ref_template="#/components/schemas/{model}"
    )
    assert schemas["AppTask"] == generated.pop("$defs")["AppTask"] and schemas["AppSummary"] == generated
    generic = {"/openapi.json", "/apps/{name}/invoke"}
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for code, response in operation["responses"].items():
                if code.startswith("2") and path == "/metrics":  # the Prometheus text format, no JSON
                    assert set(response["content"]) == {"text/plain"}
                    continue
                schema = response["content"]["application/json"]["schema"]
                if code.startswith("2") and path in generic:
                    continue
                ref = schema.get("$ref") or schema["items"]["$ref"]
                error_model = "OpenAIErrorBody" if path.startswith("/v1/") else "ErrorBody"
                assert code.startswith("2") or ref.endswith("/" + error_model), (path, code)
            body = operation.get("requestBody")
            if body is not None and path not in generic:
                assert "$ref" in body["content"]["application/json"]["schema"], path
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert "messages" in chat and "cornserve_embeddings" not in chat  # set by tasks, refused from callers
    assert set(schemas["ChatCompletionRequest"]["required"]) == {"messages", "model"}
