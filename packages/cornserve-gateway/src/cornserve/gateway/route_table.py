"""Every route of the gateway, once: its handler, its body models, its statuses.

`Gateway.app` registers exactly these routes (by handler name) and `openapi.openapi_document`
documents exactly these, from the models of `cornserve.bus.gateway_api`: the document cannot list a
route that does not exist, miss one that does, or describe a body differently from what the handler
validates. Scopes stay in `auth.ROUTE_SCOPES` (the security table is reviewed on its own); a test
checks both tables name the same routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from cornserve.bus.gateway_api import (
    AppDetail,
    AppGraph,
    AppRegistration,
    AppRemoval,
    AppSummary,
    Deployment,
    Health,
    ModelList,
    ScaleBody,
    SessionClosed,
    SessionCreate,
    SessionDeploy,
    SessionDeployed,
    SessionInfo,
    SessionInvoke,
    SessionOutputs,
    TaskLibrary,
    TaskLibraryUpload,
    TaskListing,
)
from cornserve.task.builtins import ChatCompletion, ChatCompletionRequest

Streams = Literal["none", "ndjson+sse", "sse", "text"]

BODY_ERRORS = (400, 413, 422)
"""A body that is not a JSON object (400), larger than the bus carries (413), or fails its model (422)."""
INVOKE_ERRORS = (400, 404, 409, 413, 422, 429, 502, 503, 504)
"""What invoking an app may answer (docs/api.md)."""


@dataclass(frozen=True)
class Route:
    """One route: `handler` is the name of the `Gateway` method that serves it."""

    method: str
    path: str
    handler: str
    summary: str
    response: type[BaseModel] | None
    """The success body's model (None: the app's own model, per app in the document)."""
    request: type[BaseModel] | None = None
    """The body's model (None: no body, or the app's own model for invoke routes)."""
    request_required: bool = True
    many: bool = False
    """The success body is a JSON array of `response`."""
    status: int = 200
    errors: tuple[int, ...] = ()
    streams: Streams = "none"
    """Other content types of the success body: NDJSON and SSE (invoke), or SSE (chat completions);
    `text`: only plain text (the Prometheus page)."""
    openai: bool = False
    """Errors are in OpenAI's shape (`OpenAIErrorBody`), not `ErrorBody`."""
    params: tuple[tuple[str, str], ...] = ()
    """(name, description) of each path parameter."""


APP_NAME = ("name", "the app's name")
TASK_KEY = ("key", "a deployed unit task's key (as GET /tasks lists it)")
SESSION_ID = ("id", "the session id POST /sessions returned")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/health", "health", "Cluster health", Health, errors=(503,)),
    Route("GET", "/openapi.json", "openapi", "This document", None),
    Route("GET", "/metrics", "metrics", "Prometheus metrics (text exposition; docs/operations.md lists them)", None,
          streams="text"),
    Route(
        "POST", "/apps", "register_app",
        "Register an app (deploys its tasks; `Accept: text/event-stream` streams progress events)",
        AppSummary, AppRegistration, status=201, errors=(*BODY_ERRORS, 403, 409, 502, 503),
    ),
    Route("GET", "/apps", "list_apps", "List apps", AppSummary, many=True),
    Route("GET", "/apps/{name}", "get_app", "One app, with its request and response schemas", AppDetail,
          errors=(404,), params=(APP_NAME,)),
    Route("POST", "/apps/{name}/graph", "app_graph",
          "The task graphs a registered app sends for one request, as Mermaid (traced: nothing executes; "
          "the body is the app's own request)", AppGraph, errors=(400, 404, 409, 413, 422, 504),
          params=(APP_NAME,)),
    Route("DELETE", "/apps/{name}", "unregister_app", "Unregister an app", AppRemoval, errors=(404,),
          params=(APP_NAME,)),
    Route("POST", "/apps/{name}/invoke", "invoke_admitted",
          "Invoke an app (each registered app has its own entry with its request and response models)",
          None, errors=INVOKE_ERRORS, streams="ndjson+sse", params=(APP_NAME,)),
    Route("GET", "/tasks", "list_tasks", "Deployed unit tasks and devices", TaskListing, errors=(503,)),
    Route("POST", "/tasks/{key}/scale", "scale_task", "Set the number of executors of a task", Deployment,
          ScaleBody, errors=(*BODY_ERRORS, 404, 503), params=(TASK_KEY,)),
    Route("POST", "/tasklibs", "add_tasklib", "Upload a task library", TaskLibrary, TaskLibraryUpload,
          status=201, errors=BODY_ERRORS),
    Route("GET", "/tasklibs", "list_tasklibs", "List task libraries", TaskLibrary, many=True),
    Route("POST", "/sessions", "create_session", "Open a client session", SessionInfo, SessionCreate,
          request_required=False, status=201, errors=(*BODY_ERRORS, 403, 503)),
    Route("POST", "/sessions/{id}/tasks", "deploy_session_tasks", "Deploy tasks for a session", SessionDeployed,
          SessionDeploy, errors=(*BODY_ERRORS, 403, 404, 503), params=(SESSION_ID,)),
    Route("POST", "/sessions/{id}/invoke", "invoke_session",
          "Execute a recorded task graph (NDJSON when the last output streams)", SessionOutputs, SessionInvoke,
          errors=(*BODY_ERRORS, 404, 409, 429, 502, 503, 504), params=(SESSION_ID,)),
    Route("POST", "/sessions/{id}/heartbeat", "heartbeat_session", "Keep a session alive", SessionInfo,
          errors=(404,), params=(SESSION_ID,)),
    Route("DELETE", "/sessions/{id}", "close_session", "Close a session", SessionClosed, errors=(404,),
          params=(SESSION_ID,)),
    Route("POST", "/v1/chat/completions", "chat_completions",
          "OpenAI chat completions: `model` names an app that speaks them (GET /v1/models); "
          "`stream: true` answers server-sent chunks ending with `data: [DONE]`",
          ChatCompletion, ChatCompletionRequest, errors=(400, 404, 409, 413, 429, 502, 503, 504),
          streams="sse", openai=True),
    Route("GET", "/v1/models", "list_models", "The apps that speak OpenAI chat completions, as models",
          ModelList, openai=True),
)  # fmt: skip
"""Every route of the gateway, in the order the document lists them."""
