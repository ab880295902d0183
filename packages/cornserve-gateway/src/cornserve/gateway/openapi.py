"""The gateway's OpenAPI document, with each registered app's request and response schemas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from cornserve.gateway import __version__
from cornserve.gateway.auth import ROUTE_SCOPES

if TYPE_CHECKING:
    from cornserve.gateway.apps import App

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "detail": {}},
    "required": ["error", "message"],
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


SERIALIZED_TASK = {
    "type": "object",
    "description": "a unit task as `cornserve.task.serialize_task` writes it",
    "properties": {"name": {"type": "string"}, "config": {"type": "object"}},
    "required": ["name", "config"],
}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {"description": "error", **_json({"$ref": "#/components/schemas/Error"})} for code in codes
    }


def _param(name: str, what: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": what, "schema": {"type": "string"}}


APP_NAME = _param("name", "the app's name")
TASK_KEY = _param("key", "a deployed unit task's key (as GET /tasks lists it)")
SESSION_ID = _param("id", "the session id POST /sessions returned")

BEARER = "bearer"
"""The one security scheme: `Authorization: Bearer <token>` (the admin token or an API key)."""


def _static_paths() -> dict[str, Any]:
    obj = {"type": "object"}
    body_errors = (400, 413)  # not JSON / not an object / a missing field; larger than the bus carries
    return {
        "/health": {
            "get": {
                "summary": "Cluster health",
                "security": [],
                "responses": {"200": _json(obj), "503": _json(obj)},
            }
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json(obj)}}},
        "/apps": {
            "get": {"summary": "List apps", "responses": {"200": _json({"type": "array", "items": obj})}},
            "post": {
                "summary": "Register an app (deploys its tasks; `Accept: text/event-stream` streams progress)",
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "source": {"type": "string"}},
                            "required": ["name", "source"],
                        }
                    ),
                },
                "responses": {"201": _json(obj), **_errors(*body_errors, 403, 409, 422, 502, 503)},
            },
        },
        "/apps/{name}": {
            "parameters": [APP_NAME],
            "get": {"summary": "One app", "responses": {"200": _json(obj), **_errors(404)}},
            "delete": {"summary": "Unregister an app", "responses": {"200": _json(obj), **_errors(404)}},
        },
        "/tasks": {
            "get": {
                "summary": "Deployed unit tasks and devices",
                "responses": {"200": _json(obj), **_errors(503)},
            }
        },
        "/tasks/{key}/scale": {
            "parameters": [TASK_KEY],
            "post": {
                "summary": "Set the number of executors of a task",
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "properties": {"num_executors": {"type": "integer", "minimum": 1}},
                            "required": ["num_executors"],
                        }
                    ),
                },
                "responses": {"200": _json(obj), **_errors(*body_errors, 404, 422, 503)},
            },
        },
        "/tasklibs": {
            "get": {
                "summary": "List task libraries",
                "responses": {"200": _json({"type": "array", "items": obj})},
            },
            "post": {
                "summary": "Upload a task library",
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "source": {"type": "string"}},
                            "required": ["name", "source"],
                        }
                    ),
                },
                "responses": {"201": _json(obj), **_errors(*body_errors)},
            },
        },
        "/sessions": {
            "post": {
                "summary": "Open a client session",
                "requestBody": _json(
                    {
                        "type": "object",
                        "properties": {
                            "ttl_s": {"type": "number", "exclusiveMinimum": 0},
                            "tasks": {"type": "array", "items": SERIALIZED_TASK},
                        },
                        "additionalProperties": False,
                    }
                ),
                "responses": {"201": _json(obj), **_errors(*body_errors, 403, 422, 503)},
            }
        },
        "/sessions/{id}/tasks": {
            "parameters": [SESSION_ID],
            "post": {
                "summary": "Deploy tasks for a session",
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "properties": {
                                "tasks": {"type": "array", "items": SERIALIZED_TASK, "minItems": 1}
                            },
                            "required": ["tasks"],
                            "additionalProperties": False,
                        }
                    ),
                },
                "responses": {"200": _json(obj), **_errors(*body_errors, 403, 404, 422, 503)},
            },
        },
        "/sessions/{id}/invoke": {
            "parameters": [SESSION_ID],
            "post": {
                "summary": "Execute a recorded task graph",
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "properties": {"invocations": {"type": "array", "items": obj, "minItems": 1}},
                            "required": ["invocations"],
                        }
                    ),
                },
                "responses": {"200": _json(obj), **_errors(*body_errors, 404, 409, 422, 429, 502, 503, 504)},
            },
        },
        "/sessions/{id}/heartbeat": {
            "parameters": [SESSION_ID],
            "post": {"summary": "Keep a session alive", "responses": {"200": _json(obj), **_errors(404)}},
        },
        "/sessions/{id}": {
            "parameters": [SESSION_ID],
            "delete": {"summary": "Close a session", "responses": {"200": _json(obj), **_errors(404)}},
        },
    }


def _app_schema(model: type[BaseModel], app: str, components: dict[str, Any]) -> dict[str, Any]:
    """`model`'s JSON schema; the models it nests go to `components` as `<app>.<Model>`.

    Pydantic puts nested models under the schema's own `$defs`, which a `$ref` inside an OpenAPI
    document cannot reach; prefixed by the app, two apps' models of the same name stay apart.
    """
    template = "#/components/schemas/" + app + ".{model}"
    schema = model.model_json_schema(ref_template=template)
    for name, definition in schema.pop("$defs", {}).items():
        components[f"{app}.{name}"] = definition
    return schema


def _finish(paths: dict[str, Any]) -> None:
    """Declare the auth refusals and describe every response (OpenAPI requires a description).

    Every route but the open ones answers 401 without a valid token; admin routes 403 to an API key.
    """
    for path, item in paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            if operation.get("security") != []:
                scope = ROUTE_SCOPES.get((method.upper(), path), "invoke")
                operation["responses"].update(_errors(*((401, 403) if scope == "admin" else (401,))))
            for code, response in operation["responses"].items():
                response.setdefault("description", "success" if code.startswith("2") else "error")


def openapi_document(apps: list[App]) -> dict[str, Any]:
    """OpenAPI 3.1: the fixed routes, plus `/apps/<name>/invoke` for every registered app."""
    paths = _static_paths()
    components: dict[str, Any] = {"Error": ERROR}
    for app in apps:
        assert app.spec is not None
        name = app.record.name
        response = _app_schema(app.spec.response_model, name, components)
        request_schema = _app_schema(app.spec.request_model, name, components)
        content: dict[str, Any]
        if app.spec.streaming:
            content = {
                "application/x-ndjson": {"schema": response},
                "text/event-stream": {"schema": response},
            }
        else:
            content = {"application/json": {"schema": response}}
        paths[f"/apps/{name}/invoke"] = {
            "post": {
                "summary": f"Invoke app {name}",
                "requestBody": {"required": True, **_json(request_schema)},
                "responses": {
                    "200": {"description": "response", "content": content},
                    **_errors(400, 404, 409, 413, 422, 429, 502, 503, 504),
                },
            }
        }
    _finish(paths)
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
