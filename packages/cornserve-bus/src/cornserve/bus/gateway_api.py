"""The gateway's HTTP contract: every request and response body of its routes, as pydantic models.

The gateway validates request bodies with these models and answers with them; its OpenAPI document
is generated from them (`cornserve.gateway.openapi`); `cornserve.client` parses replies into them.
They live here, in the contract package, so that the gateway and the client share one definition
without either importing the other.

Request bodies forbid unknown fields (a typo fails loudly with 422). Response bodies ignore fields
they do not know, so a client keeps working against a newer gateway that adds one.

An app's own request and response bodies are the app's models (`POST /apps/{name}/invoke`), and the
OpenAI-compatible routes use the chat-completion models of `cornserve.task.builtins`; the models
those routes add of their own (`/v1/models`, OpenAI's error shape) are here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cornserve.bus.control import DeploymentInfo, DeviceInfo, ExecutorInfo, ProgressEvent


class RequestBody(BaseModel):
    """Base of request bodies: unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid")


class ResponseBody(BaseModel):
    """Base of response bodies: unknown fields are ignored by readers (a newer gateway may add some)."""

    model_config = ConfigDict(extra="ignore")


# ----- errors ---------------------------------------------------------------------------------------


class ErrorBody(ResponseBody):
    """Every error of the Cornserve routes: a kind a program can switch on and a message a person can act on."""

    error: str = Field(description="the kind of error, e.g. `app_not_found`, `overloaded`")
    message: str = Field(description="what went wrong and what to do about it")
    detail: Any = Field(default=None, description="structured detail, e.g. pydantic's error list on 422")


class OpenAIErrorDetail(ResponseBody):
    """The inner object of OpenAI's error shape."""

    message: str
    type: str = Field(description="e.g. `invalid_request_error`, `authentication_error`, `rate_limit_error`")
    param: str | None = None
    code: str | None = Field(default=None, description="Cornserve's error kind, e.g. `model_not_found`")


class OpenAIErrorBody(ResponseBody):
    """Every error of the `/v1` routes, in the shape OpenAI's clients parse."""

    error: OpenAIErrorDetail


# ----- health ---------------------------------------------------------------------------------------


class Health(ResponseBody):
    """GET /health: whether NATS, the resource manager and a dispatcher answer."""

    status: Literal["ok", "degraded"]
    version: str
    nats: bool
    services: dict[str, int] = Field(description="service name → instances that answered a ping")


# ----- apps -----------------------------------------------------------------------------------------


class AppRegistration(RequestBody):
    """POST /apps."""

    name: str = Field(description="lowercase letters, digits and '-'")
    source: str = Field(description="the app's Python source")


class AppTask(ResponseBody):
    """One unit task an app uses."""

    key: str = Field(description="the deployment key (as GET /tasks lists it)")
    task: str = Field(description="the unit task's class name")
    name: str = Field(description="a readable name, e.g. `LLMTask[embeddings]`")


class AppSummary(ResponseBody):
    """An app as POST /apps (and its `done` event) and GET /apps answer."""

    name: str
    state: str = Field(description="`deploying`, `ready` or `failed`")
    tasks: list[AppTask] = Field(default_factory=list)
    streaming: bool | None = Field(default=None, description="whether `serve` streams (None: not loaded)")
    openai_models: list[str] = Field(
        default_factory=list,
        description="the `model` names under which /v1/chat/completions serves the app (empty: it does not)",
    )
    message: str | None = None


class AppDetail(AppSummary):
    """GET /apps/{name}: the summary plus the JSON schemas of the app's request and response."""

    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] | None = None
    admission: dict[str, int] | None = Field(
        default=None, description="invocations `running` and `waiting` for a slot of the app's admission gate"
    )


class AppGraph(ResponseBody):
    """POST /apps/{name}/graph: the task graphs the app's `serve` sends for one request (nothing runs)."""

    name: str
    graphs: list[str] = Field(description="each graph as Mermaid text, in the order `serve` sends them")
    dots: list[str] = Field(default_factory=list, description="the same graphs in Graphviz DOT")


class Released(ResponseBody):
    """What unregistering an app or closing a session released."""

    released: list[str] = Field(description="task keys this owner no longer uses")
    torn_down: list[str] = Field(description="task keys no one uses any more, now torn down")


class AppRemoval(Released):
    """DELETE /apps/{name}."""

    name: str


RegisterProgress = ProgressEvent
"""An `event: progress` of POST /apps with `Accept: text/event-stream`."""


# ----- tasks and task libraries ----------------------------------------------------------------------


class TaskSummary(ResponseBody):
    """One deployed unit task."""

    key: str
    task: str = Field(description="the unit task's class name")
    library: str = Field(description="its task library, or the module that defines it")
    config: dict[str, Any] | None = None
    state: str
    users: list[str] = Field(description="`app:<name>` or `session:<fingerprint>`")
    executors: list[ExecutorInfo] = Field(default_factory=list)
    devices: list[DeviceInfo] = Field(default_factory=list)
    message: str = ""
    metrics_url: str | None = Field(
        default=None, description="the task manager's Prometheus page (None: none)"
    )


class TaskListing(ResponseBody):
    """GET /tasks."""

    tasks: list[TaskSummary]
    devices: list[DeviceInfo]


class ScaleBody(RequestBody):
    """POST /tasks/{key}/scale."""

    num_executors: int = Field(ge=1, strict=True)


Deployment = DeploymentInfo
"""POST /tasks/{key}/scale answers the task's deployment."""


class TaskLibraryUpload(RequestBody):
    """POST /tasklibs."""

    name: str
    source: str = Field(description="Python source defining UnitTask and TaskExecutionDescriptor classes")


class TaskLibrary(ResponseBody):
    """A stored task library (without its source)."""

    name: str
    sha256: str
    unit_tasks: list[str]
    descriptors: list[str]
    created_at: float


# ----- sessions -------------------------------------------------------------------------------------


class SerializedTask(BaseModel):
    """A unit task as `cornserve.task.serialize_task` writes it."""

    name: str = Field(description="`<library>:<qualname>`")
    config: dict[str, Any]


class SessionCreate(RequestBody):
    """POST /sessions (the body may be absent)."""

    ttl_s: float | None = Field(default=None, gt=0, allow_inf_nan=False, strict=True)
    """Seconds without heartbeats before the session closes (default: the gateway's --session-ttl)."""
    tasks: list[Any] | None = None
    """Unit tasks (serialized, see `SerializedTask`) to deploy right away."""


class SessionDeploy(RequestBody):
    """POST /sessions/{id}/tasks."""

    tasks: list[Any] = Field(description="serialized unit tasks (see `SerializedTask`)")


class SessionInfo(ResponseBody):
    """A session as its own client sees it (the id is returned by POST /sessions only)."""

    session_id: str
    owner: str
    ttl_s: float
    tasks: list[str]


class SessionDeployed(SessionInfo):
    """POST /sessions/{id}/tasks."""

    deployed: list[str]


class SessionInvoke(RequestBody):
    """POST /sessions/{id}/invoke: a recorded task graph."""

    invocations: list[dict[str, Any]] = Field(description="`TaskInvocation` JSON, in order")


class SessionClosed(Released):
    """DELETE /sessions/{id}."""

    session_id: str


class SessionOutputs(ResponseBody):
    """POST /sessions/{id}/invoke: every invocation's output (null for a streamed last output)."""

    outputs: list[Any]


class SessionStreamLine(ResponseBody):
    """A line after the first of a streamed session invoke: an item, the end, or an error."""

    item: Any = None
    end: bool | None = None
    error: ErrorBody | None = None


# ----- OpenAI-compatible listings --------------------------------------------------------------------


class ModelCard(ResponseBody):
    """One model of GET /v1/models: an app that speaks OpenAI chat completions (or one of its aliases)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cornserve"


class ModelList(ResponseBody):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
