"""The gateway's OpenAPI document is usable as written: every `$ref` resolves and a client tool loads it.

An app's request model that nests another model used to leave a `$ref` to a component the document
did not have (pydantic keeps nested models in the schema's own `$defs`), so a generated client or a
fuzzer could not resolve the invoke route's body.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case

from cornserve.app import validate_app
from cornserve.bus.control import AppRecord
from cornserve.gateway.apps import App
from cornserve.gateway.auth import ROUTE_SCOPES
from cornserve.gateway.openapi import openapi_document

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
