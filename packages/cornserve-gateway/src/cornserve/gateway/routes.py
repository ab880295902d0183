"""The gateway's HTTP API (see docs/api.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Collection
from typing import Any

from aiohttp import web
from nats.aio.client import Client
from nats.js.kv import KeyValue
from pydantic import BaseModel, TypeAdapter, ValidationError

from cornserve.app import AppConfig, trace_app
from cornserve.bus.control import ProgressEvent, TaskLibraryRecord
from cornserve.bus.gateway_api import (
    AppGraph,
    AppRegistration,
    Health,
    ScaleBody,
    SessionCreate,
    SessionDeploy,
    SessionDeployed,
    SessionInvoke,
    SessionOutputs,
    TaskLibrary,
    TaskLibraryUpload,
    TaskListing,
    TaskSummary,
)
from cornserve.bus.kv import kv_all, kv_put
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway import __version__
from cornserve.gateway.admission import ARRIVED_KEY, Admission, AdmissionLimits
from cornserve.gateway.app_loading import AppLoader
from cornserve.gateway.apps import LIST_TIMEOUT_S, App, AppRegistry
from cornserve.gateway.auth import Credentials, auth_middleware, check_route_scopes
from cornserve.gateway.bodies import MAX_BODY, MAX_BODY_KEY, read_body, read_json, reply
from cornserve.gateway.disconnect import cancel_on_disconnect
from cornserve.gateway.discovery import ping_services
from cornserve.gateway.driver import first_item, parse_request, run_streaming, run_unary
from cornserve.gateway.errors import HTTPError, is_openai_path, to_http_error
from cornserve.gateway.metrics import (
    count_stream_error,
    timed_stream,
    watch_admission,
)
from cornserve.gateway.openai_compat import OpenAIFront
from cornserve.gateway.openapi import openapi_document
from cornserve.gateway.route_table import ROUTES
from cornserve.gateway.sessions import SessionRegistry, redact_path
from cornserve.gateway.streaming import StreamWriter, wants_sse
from cornserve.gateway.tracing import observing_middleware
from cornserve.runtime.logging import set_request_id
from cornserve.runtime.metrics import metrics_route
from cornserve.task import ClassKey, GraphRunner, Stream, TaskInvocation, TaskOutput
from cornserve.task.errors import TaskError
from cornserve.task.library import check_library_name, load_task_library

logger = logging.getLogger(__name__)

GRAPH_TRACE_TIMEOUT_S = 30.0
"""Deadline of tracing one app request (`serve` only records, so it should take milliseconds)."""

INVOCATIONS = TypeAdapter(list[TaskInvocation])
REQUEST_ID_HEADER = "X-Request-Id"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What a caller's request id may look like (it goes into every log line and onto the bus)."""


def request_id_for(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when it is a plain token of at most 128 characters, else a new id."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every exception into a JSON error response with the right status.

    Every request runs in its own task; its log lines carry the caller's ``X-Request-Id`` (or a new id),
    and so do the graphs it sends to the dispatchers (whose log lines then carry the same id).
    """
    set_request_id(request_id_for(request))
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status >= 400 and is_openai_path(request.path):  # no such route (or method) under /v1/
            kind = "not_found" if exc.status == 404 else "method_not_allowed"
            return HTTPError(exc.status, kind, f"{request.method} {request.path}: {exc.reason}").response_for(
                request
            )
        raise
    except Exception as exc:
        error = to_http_error(exc)
        if error.status >= 500:
            path = redact_path(request.path)
            logger.warning("%s %s -> %d: %s", request.method, path, error.status, error.message)
        return error.response_for(request)


def _library(record: TaskLibraryRecord) -> TaskLibrary:
    return TaskLibrary.model_validate(record.model_dump(exclude={"source", "schema_version"}))


class Gateway:
    """Holds the gateway's state and serves its routes."""

    def __init__(
        self,
        nc: Client,
        apps_kv: KeyValue,
        tasklibs_kv: KeyValue,
        dispatcher: GraphRunner,
        rm: ResourceManagerClient,
        sessions: SessionRegistry,
        request_timeout_s: float = 600.0,
        allowed_flags: Collection[str] = (),
        app_loader: AppLoader | None = None,
        admission: AdmissionLimits | None = None,
    ) -> None:
        """`request_timeout_s` is the deadline of one app invocation (see `invoke_app`)."""
        self.nc = nc
        self.rm = rm
        self.apps = AppRegistry(apps_kv, rm, allowed_flags=allowed_flags, loader=app_loader)
        self.sessions = sessions
        self.dispatcher = dispatcher
        self._tasklibs_kv = tasklibs_kv
        self.request_timeout_s = request_timeout_s
        self.admission = Admission(admission or AdmissionLimits(), request_timeout_s)
        watch_admission(self.admission.stats)
        self.openai = OpenAIFront(self.apps, self.admission, request_timeout_s)

    def app(self, credentials: Credentials, max_body: int = MAX_BODY) -> web.Application:
        """The aiohttp application with every route, each behind the scope `auth.ROUTE_SCOPES` gives it.

        `max_body` caps request bodies (413 beyond it); `serve` passes the bus's `max_payload`, since
        no body can be larger than what the bus carries: an invoke's input travels in a graph, a
        source into the KV store. Bigger bodies are thus refused before any work starts.
        """
        app = web.Application(
            middlewares=[
                observing_middleware(),
                error_middleware,
                auth_middleware(credentials),
            ],
            client_max_size=max_body,
        )
        app[MAX_BODY_KEY] = max_body
        app.add_routes(
            [
                # web.get also answers HEAD, as every GET route always has
                web.get(r.path, getattr(self, r.handler))
                if r.method == "GET"
                else web.route(r.method, r.path, getattr(self, r.handler))
                for r in ROUTES
            ]
        )
        check_route_scopes(app)
        return app

    # ----- health and docs -------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 when NATS, the resource manager and at least one dispatcher answer; else 503."""
        services = await ping_services(self.nc)
        counts = {name: len(found) for name, found in services.items()}
        ok = (
            self.nc.is_connected
            and counts.get("cornserve-resource-manager", 0) > 0
            and counts.get("cornserve-dispatcher", 0) > 0
        )
        body = Health(
            status="ok" if ok else "degraded", version=__version__, nats=self.nc.is_connected, services=counts
        )
        return reply(body, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus text exposition of this gateway (`cornserve.gateway.metrics`); no token needed."""
        return await metrics_route(request)

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI 3.1 document, including every registered app's request and response schema."""
        return web.json_response(openapi_document([a for a in self.apps.all() if a.spec is not None]))

    # ----- the OpenAI-compatible routes (openai_compat.py) ------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self.openai.chat_completions(request)

    async def list_models(self, request: web.Request) -> web.Response:
        """GET /v1/models."""
        return await self.openai.list_models(request)

    # ----- apps ------------------------------------------------------------------------------------

    async def register_app(self, request: web.Request) -> web.StreamResponse:
        """POST /apps {"name", "source"} → 201 once deployed (or an SSE progress stream)."""
        body = await read_body(request, AppRegistration)
        name, source = body.name, body.source
        if not wants_sse(request):
            app = await self.apps.register(name, source)
            return reply(app.summary(), status=201)
        events = self.apps.register_with_progress(name, source)
        first = await anext(events)  # validation and name errors surface here, as plain HTTP errors
        stream = StreamWriter(request, status=201)
        await stream.start()
        try:
            item: ProgressEvent | App = first
            while True:
                if isinstance(item, App):
                    await stream.send(item.summary().model_dump_json(), event="done")
                    break
                await stream.send(item.model_dump(mode="json"), event="progress")
                item = await anext(events)
        except Exception as exc:
            await stream.fail(to_http_error(exc).body())
        return await stream.close()

    async def list_apps(self, request: web.Request) -> web.Response:
        """GET /apps."""
        return reply([a.summary() for a in self.apps.all()])

    async def get_app(self, request: web.Request) -> web.Response:
        """GET /apps/{name}: state, tasks, invocations running and queued, request/response schemas."""
        app = self.apps.get(request.match_info["name"])
        return reply(app.detail().model_copy(update={"admission": self.admission.counts(app.record.name)}))

    async def app_graph(self, request: web.Request) -> web.Response:
        """POST /apps/{name}/graph: trace the app's `serve` on the request body (nothing executes)."""
        app = self.apps.get(request.match_info["name"])
        if app.spec is None:
            raise HTTPError(
                409, "app_not_ready", f"app {app.record.name!r} is {app.record.state}: {app.record.message}"
            )
        payload = parse_request(app.spec, await read_json(request))  # a ValidationError answers 422
        try:
            async with asyncio.timeout(GRAPH_TRACE_TIMEOUT_S):
                graphs = await trace_app(app.spec, payload)
        except TimeoutError:
            raise HTTPError(
                504,
                "trace_timeout",
                f"tracing app {app.record.name!r} took longer than {GRAPH_TRACE_TIMEOUT_S:g} s",
            ) from None
        except (TaskError, ValueError) as exc:  # e.g. a graph breaks a static-graph rule
            raise HTTPError(422, "trace_failed", f"tracing app {app.record.name!r} failed: {exc}") from None
        return reply(
            AppGraph(
                name=app.record.name,
                graphs=[g.to_mermaid() for g in graphs],
                dots=[g.to_dot() for g in graphs],
            )
        )

    async def unregister_app(self, request: web.Request) -> web.Response:
        """DELETE /apps/{name}: tasks no other app or session uses are torn down."""
        return reply(await self.apps.unregister(request.match_info["name"]))

    def _timed_out(self, name: str) -> HTTPError:
        return HTTPError(
            504,
            "request_timeout",
            f"app {name!r} did not finish within the request deadline of {self.request_timeout_s:g} s "
            "(the gateway's --request-timeout); the app was cancelled",
        )

    async def invoke_admitted(self, request: web.Request) -> web.StreamResponse:
        """POST /apps/{name}/invoke behind the app's admission gate (429/503 when full, see admission.py)."""
        return await self.admission.run(request, self._admission_config, self.invoke_app)

    def _admission_config(self, request: web.Request) -> type[AppConfig] | None:
        """The config of the app an invoke names, for its admission gate (None while not ready; 404 if unknown)."""
        app = self.apps.get(request.match_info["name"])
        return app.spec.config if app.spec is not None and app.record.state == "ready" else None

    async def invoke_app(self, request: web.Request) -> web.StreamResponse:
        """POST /apps/{name}/invoke; a client that hangs up cancels the app driver (`disconnect.py`)."""
        async with cancel_on_disconnect(request):
            return await self._invoke_app(request)

    async def _invoke_app(self, request: web.Request) -> web.StreamResponse:
        """POST /apps/{name}/invoke: run the app's serve on the request JSON.

        The whole invocation (the app driver, its graphs and, when it streams, the whole stream)
        must finish within `request_timeout_s`: past it the driver is cancelled and the caller gets
        504 (or, once a stream has started, an error event that ends the stream).
        """
        app = self.apps.get(request.match_info["name"])
        if app.spec is None or app.record.state != "ready":
            raise HTTPError(
                409, "app_not_ready", f"app {app.record.name!r} is {app.record.state}: {app.record.message}"
            )
        spec = app.spec
        loop = asyncio.get_running_loop()
        deadline = request.get(ARRIVED_KEY, loop.time()) + self.request_timeout_s  # queueing counts
        payload = parse_request(spec, await read_json(request))
        name = app.record.name
        if not spec.streaming:
            limit = asyncio.timeout_at(deadline)
            try:
                async with limit:
                    result = await run_unary(spec, payload)
            except TimeoutError:
                if limit.expired():
                    raise self._timed_out(name) from None
                raise
            return web.Response(text=result.model_dump_json(), content_type="application/json")
        items = timed_stream(name, request.get(ARRIVED_KEY, loop.time()), run_streaming(spec, payload))
        first: BaseModel | None = await first_item(items, deadline, lambda: self._timed_out(name))
        stream = StreamWriter(request)
        await stream.start()
        limit = asyncio.timeout_at(deadline)
        try:
            async with limit:
                if first is not None:
                    await stream.send(first.model_dump_json())
                    async for item in items:
                        await stream.send(item.model_dump_json())
        except Exception as exc:
            error = self._timed_out(name) if limit.expired() else to_http_error(exc)
            logger.warning("app %r failed while streaming: %s", name, error.message)
            count_stream_error(name)
            await stream.fail(error.body())
        finally:
            await items.aclose()
        return await stream.close()

    # ----- tasks -----------------------------------------------------------------------------------

    async def list_tasks(self, request: web.Request) -> web.Response:
        """GET /tasks: deployed unit tasks with users, executors and devices."""
        state = await self.rm.state()
        tasks = []
        for d in state.deployments:
            cls_key = ClassKey.parse(str(d.task.get("name")))
            config = d.task.get("config")
            tasks.append(
                TaskSummary(
                    key=d.task_key,
                    task=cls_key.qualname,
                    library=cls_key.library,
                    config=config if isinstance(config, dict) else None,
                    state=d.state,
                    users=d.users,
                    executors=d.executors,
                    devices=d.devices,
                    message=d.message,
                    metrics_url=d.metrics_url,
                )
            )
        return reply(TaskListing(tasks=tasks, devices=state.devices))

    async def scale_task(self, request: web.Request) -> web.Response:
        """POST /tasks/{key}/scale {"num_executors": N}."""
        body = await read_body(request, ScaleBody)
        return reply(await self.rm.scale(request.match_info["key"], body.num_executors))

    # ----- task libraries --------------------------------------------------------------------------

    async def add_tasklib(self, request: web.Request) -> web.Response:
        """POST /tasklibs {"name", "source"}: load it here (to validate), store it for every service."""
        body = await read_body(request, TaskLibraryUpload)
        name, source = body.name, body.source
        try:
            check_library_name(name)
            loaded = load_task_library(name, source)
        except Exception as exc:
            raise HTTPError(400, "invalid_task_library", str(exc)) from exc
        record = TaskLibraryRecord.from_loaded(source, loaded)
        await kv_put(self._tasklibs_kv, name, record)
        return reply(_library(record), status=201)

    async def list_tasklibs(self, request: web.Request) -> web.Response:
        """GET /tasklibs."""
        async with asyncio.timeout(LIST_TIMEOUT_S):  # a stalled KV listing answers 504, never hangs
            records = await kv_all(self._tasklibs_kv, TaskLibraryRecord)
        return reply([_library(r) for r in sorted(records, key=lambda r: r.name)])

    # ----- sessions (notebooks / SDK) --------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        """POST /sessions {"ttl_s"?, "tasks"?}: a client session, optionally deploying tasks.

        The reply carries the session id, the capability for every other /sessions route; it is
        returned here only.
        """
        spec = await read_body(request, SessionCreate) if request.can_read_body else SessionCreate()
        session = self.sessions.create(spec.ttl_s)
        if spec.tasks:
            try:
                await self.sessions.deploy(session, spec.tasks)
            except BaseException:
                await self.sessions.close(session.id)
                raise
        return reply(session.summary(), status=201)

    async def deploy_session_tasks(self, request: web.Request) -> web.Response:
        """POST /sessions/{id}/tasks {"tasks": [...]}: deploy more unit tasks for the session."""
        session = self.sessions.get(request.match_info["id"])
        spec = await read_body(request, SessionDeploy)
        tasks = await self.sessions.deploy(session, spec.tasks)
        deployed = SessionDeployed(
            **session.summary().model_dump(), deployed=[t.deployment_key for t in tasks]
        )
        return reply(deployed)

    async def heartbeat_session(self, request: web.Request) -> web.Response:
        """POST /sessions/{id}/heartbeat: keep the session (and its tasks) alive."""
        return reply(self.sessions.get(request.match_info["id"]).summary())

    async def close_session(self, request: web.Request) -> web.Response:
        """DELETE /sessions/{id}: release the session's tasks."""
        return reply(await self.sessions.close(request.match_info["id"]))

    async def invoke_session(self, request: web.Request) -> web.StreamResponse:
        """POST /sessions/{id}/invoke; a client that hangs up cancels the graph (`disconnect.py`)."""
        async with cancel_on_disconnect(request):
            return await self._invoke_session(request)

    async def _invoke_session(self, request: web.Request) -> web.StreamResponse:
        """POST /sessions/{id}/invoke {"invocations": [...]}: execute a recorded graph.

        Replies `{"outputs": [...]}`; when the last output streams, replies NDJSON: that object
        first (with null for the stream), then `{"item": ...}` lines, then `{"end": true}`.
        """
        session = self.sessions.get(request.match_info["id"])
        body = await read_body(request, SessionInvoke)
        try:
            invocations = INVOCATIONS.validate_python(body.invocations)
        except ValidationError as exc:
            raise HTTPError(
                422, "validation_error", "invalid invocations", json.loads(exc.json(include_url=False))
            ) from exc
        if not invocations:
            raise HTTPError(422, "validation_error", '"invocations" must not be empty')
        for position, inv in enumerate(invocations):
            if inv.task.deployment_key not in session.task_keys:
                raise HTTPError(
                    409,
                    "task_not_deployed",
                    f"{inv.task.display_name()} at position {position} (key {inv.task.deployment_key}) is not deployed "
                    "in this session; deploy it first",
                )
        outputs: list[TaskOutput] = await self.dispatcher.run_graph(invocations)
        dumped = [None if isinstance(o, Stream) else o.model_dump(mode="json") for o in outputs]
        last = outputs[-1]
        if not isinstance(last, Stream):
            return reply(SessionOutputs(outputs=dumped))
        stream = StreamWriter(request)
        await stream.start()
        await stream.send(SessionOutputs(outputs=dumped).model_dump_json())
        try:
            async for item in last:
                await stream.send(
                    {"item": item.model_dump(mode="json") if isinstance(item, BaseModel) else item}
                )
                session.last_seen = time.monotonic()
            await stream.send({"end": True})
        except Exception as exc:
            await stream.fail({"error": to_http_error(exc).body()})
        finally:
            await last.aclose()  # a stream not read to its end is cancelled in the dispatcher
        return await stream.close()
