"""The gateway's OpenAPI document, with each registered app's request and response schemas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cornserve.gateway import __version__

if TYPE_CHECKING:
    from cornserve.gateway.apps import App

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "detail": {}},
    "required": ["error", "message"],
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(code): {"description": "error", **_json({"$ref": "#/components/schemas/Error"})} for code in codes
    }


def _static_paths() -> dict[str, Any]:
    obj = {"type": "object"}
    return {
        "/health": {
            "get": {"summary": "Cluster health", "responses": {"200": _json(obj), "503": _json(obj)}}
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json(obj)}}},
        "/apps": {
            "get": {"summary": "List apps", "responses": {"200": _json({"type": "array", "items": obj})}},
            "post": {
                "summary": "Register an app (deploys its tasks; `Accept: text/event-stream` streams progress)",
                "requestBody": _json(
                    {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "source": {"type": "string"}},
                        "required": ["name", "source"],
                    }
                ),
                "responses": {"201": _json(obj), **_errors(400, 409, 502, 503)},
            },
        },
        "/apps/{name}": {
            "get": {"summary": "One app", "responses": {"200": _json(obj), **_errors(404)}},
            "delete": {"summary": "Unregister an app", "responses": {"200": _json(obj), **_errors(404)}},
        },
        "/tasks": {"get": {"summary": "Deployed unit tasks and devices", "responses": {"200": _json(obj)}}},
        "/tasks/{key}/scale": {
            "post": {
                "summary": "Set the number of executors of a task",
                "requestBody": _json(
                    {"type": "object", "properties": {"num_executors": {"type": "integer", "minimum": 1}}}
                ),
                "responses": {"200": _json(obj), **_errors(404, 422, 503)},
            }
        },
        "/tasklibs": {
            "get": {
                "summary": "List task libraries",
                "responses": {"200": _json({"type": "array", "items": obj})},
            },
            "post": {"summary": "Upload a task library", "responses": {"201": _json(obj), **_errors(400)}},
        },
        "/sessions": {"post": {"summary": "Open a client session", "responses": {"201": _json(obj)}}},
        "/sessions/{id}/tasks": {
            "post": {"summary": "Deploy tasks for a session", "responses": {"200": _json(obj)}}
        },
        "/sessions/{id}/invoke": {
            "post": {"summary": "Execute a recorded task graph", "responses": {"200": _json(obj)}}
        },
        "/sessions/{id}/heartbeat": {
            "post": {"summary": "Keep a session alive", "responses": {"200": _json(obj)}}
        },
        "/sessions/{id}": {"delete": {"summary": "Close a session", "responses": {"200": _json(obj)}}},
    }


def openapi_document(apps: list[App]) -> dict[str, Any]:
    """OpenAPI 3.1: the fixed routes, plus `/apps/<name>/invoke` for every registered app."""
    paths = _static_paths()
    for app in apps:
        assert app.spec is not None
        name = app.record.name
        response = app.spec.response_model.model_json_schema(ref_template="#/components/schemas/{model}")
        request_schema = app.spec.request_model.model_json_schema(ref_template="#/components/schemas/{model}")
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
                    **_errors(404, 409, 422, 429, 502, 503, 504),
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cornserve gateway", "version": __version__},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }
