"""The gateway's OpenAPI 3.1 document, generated from `route_table.ROUTES` and their pydantic models.

Nothing here is written by hand but the prose: every body schema is a model's JSON schema
(`cornserve.bus.gateway_api`, the chat-completion models of `cornserve.task.builtins`, each app's
own models), every route and status comes from the route table, and the auth refusals from
`auth.ROUTE_SCOPES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from cornserve.bus.gateway_api import ErrorBody, OpenAIErrorBody
from cornserve.gateway import __version__
from cornserve.gateway.auth import ROUTE_SCOPES
from cornserve.gateway.driver import INTERNAL_FIELDS
from cornserve.gateway.route_table import ROUTES, Route

if TYPE_CHECKING:
    from cornserve.gateway.apps import App

BEARER = "bearer"
"""The one security scheme: `Authorization: Bearer <token>` (the admin token or an API key)."""

REF = "#/components/schemas/{model}"


def _models() -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Every model the fixed routes use: requests as validated, responses as serialized."""
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (ErrorBody, "serialization"),
        (OpenAIErrorBody, "serialization"),
    ]
    for route in ROUTES:
        if route.request is not None:
            pairs.append((route.request, "validation"))
        if route.response is not None:
            pairs.append((route.response, "serialization"))
    return list(dict.fromkeys(pairs))


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error_responses(route: Route, codes: tuple[int, ...], error_ref: str) -> dict[str, Any]:
    return {str(code): {"description": "error", "content": _json({"$ref": error_ref})} for code in codes}


def _auth_errors(route: Route) -> tuple[int, ...]:
    """401 without a valid token (every route but the open ones); 403 for an API key on an admin route."""
    template = "/apps/{name}/invoke" if route.handler.startswith("invoke_app_") else route.path
    scope = ROUTE_SCOPES.get((route.method, template), "admin")
    return {"open": (), "invoke": (401,), "admin": (401, 403)}[scope]


def _content(route: Route, schema: dict[str, Any]) -> dict[str, Any]:
    if route.streams == "text":
        return {"text/plain": {"schema": {"type": "string", "description": "the Prometheus text format"}}}
    content = _json({"type": "array", "items": schema} if route.many else schema)
    if route.streams == "ndjson+sse":
        content["application/x-ndjson"] = {"schema": schema}
        content["text/event-stream"] = {"schema": schema}
    elif route.streams == "sse":
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "`data: <chunk JSON>` events, then `data: [DONE]`"}
        }
    return content


def _operation(
    route: Route,
    request_schema: dict[str, Any] | None,
    response_schema: dict[str, Any],
    summary: str | None = None,
) -> dict[str, Any]:
    error_ref = REF.format(model="OpenAIErrorBody" if route.openai else "ErrorBody")
    operation: dict[str, Any] = {
        "summary": summary or route.summary,
        "operationId": route.handler,
        "responses": {
            str(route.status): {"description": "success", "content": _content(route, response_schema)},
            **_error_responses(route, (*route.errors, *_auth_errors(route)), error_ref),
        },
    }
    if not _auth_errors(route):
        operation["security"] = []
    if request_schema is not None:
        operation["requestBody"] = {"required": route.request_required, "content": _json(request_schema)}
    return operation


def _app_schema(
    model: type[BaseModel], app: str, components: dict[str, Any], mode: JsonSchemaMode
) -> dict[str, Any]:
    """`model`'s JSON schema; the models it nests go to `components` as `<app>.<Model>`.

    Pydantic puts nested models under the schema's own `$defs`, which a `$ref` inside an OpenAPI
    document cannot reach; prefixed by the app, two apps' models of the same name stay apart.
    """
    schema = model.model_json_schema(ref_template=REF.format(model=app + ".{model}"), mode=mode)
    for name, definition in schema.pop("$defs", {}).items():
        components[f"{app}.{name}"] = definition
    return schema


def _as_openai_request(schema: dict[str, Any]) -> dict[str, Any]:
    """The chat request as `/v1/chat/completions` takes it: `model` required, no internal fields."""
    properties = {k: v for k, v in schema.get("properties", {}).items() if k not in INTERNAL_FIELDS}
    required = [*schema.get("required", []), "model"]
    return {**schema, "properties": properties, "required": list(dict.fromkeys(required))}


ANY_OBJECT: dict[str, Any] = {"type": "object", "description": "the app's request model (see its own entry)"}
ANY_JSON: dict[str, Any] = {"description": "the app's response model (see its own entry)"}
OPENAPI_DOCUMENT: dict[str, Any] = {"type": "object", "description": "an OpenAPI 3.1 document"}


def openapi_document(apps: list[App]) -> dict[str, Any]:
    """OpenAPI 3.1: every route of `ROUTES`, plus `/apps/<name>/invoke` for every registered app."""
    refs, definitions = models_json_schema(_models(), ref_template=REF)
    components: dict[str, Any] = dict(definitions.get("$defs", {}))
    paths: dict[str, Any] = {}
    for route in ROUTES:
        request_schema: dict[str, Any] | None = None
        if route.request is not None:
            request_schema = refs[(route.request, "validation")]
            if route.openai:
                name = request_schema["$ref"].rsplit("/", 1)[1]
                components[name] = _as_openai_request(components[name])
        elif route.path.endswith("/invoke"):
            request_schema = ANY_OBJECT
        if route.response is not None:
            response_schema = refs[(route.response, "serialization")]
        else:
            response_schema = OPENAPI_DOCUMENT if route.path == "/openapi.json" else ANY_JSON
        item = paths.setdefault(route.path, {})
        if route.params:
            item["parameters"] = [
                {"name": n, "in": "path", "required": True, "description": d, "schema": {"type": "string"}}
                for n, d in route.params
            ]
        item[route.method.lower()] = _operation(route, request_schema, response_schema)
    invoke = next(r for r in ROUTES if r.path == "/apps/{name}/invoke")
    for app in apps:
        assert app.spec is not None
        name = app.record.name
        response = _app_schema(app.spec.response_model, name, components, "serialization")
        request = _app_schema(app.spec.request_model, name, components, "validation")
        streams: Literal["none", "ndjson+sse"] = "ndjson+sse" if app.spec.streaming else "none"
        concrete = Route(
            invoke.method, f"/apps/{name}/invoke", f"invoke_app_{name}", f"Invoke app {name}", None,
            errors=invoke.errors, streams=streams,
        )  # fmt: skip
        paths[concrete.path] = {"post": _operation(concrete, request, response)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cornserve gateway", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {BEARER: {"type": "http", "scheme": "bearer"}},
        },
        "security": [{BEARER: []}],
    }
