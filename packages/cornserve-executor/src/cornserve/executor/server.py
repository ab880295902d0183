"""The executor process: an aiohttp server that calls a task library's handler per invocation.

Start-up order matters to the task manager: the HTTP port opens first (so `/health` answers 503
while starting), then the process connects to NATS, loads the task libraries, rebuilds its task,
finds the handler and connects its sidecar client; only then does `/health` turn 200.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from nats.aio.client import Client
from pydantic import ValidationError

from cornserve.bus.control import TaskLibraryRecord
from cornserve.bus.invoke_channel import CallMeta
from cornserve.bus.kv import TaskLibrarySync
from cornserve.executor.channel import Answer, ChannelServer
from cornserve.executor.context import ExecutorContext, Handler
from cornserve.executor.descriptor import (
    HEALTH_PATH,
    INVOKE_PATH,
    PythonExecutorDescriptor,
    item_adapter,
    stream_item_type,
)
from cornserve.executor.settings import PythonExecutorSettings
from cornserve.runtime.httptrace import server_span_middleware
from cornserve.runtime.metrics import metrics_route
from cornserve.runtime.nats import connect_nats
from cornserve.runtime.natsstop import current_budget
from cornserve.runtime.tracing import mark_error, server_span, set_attributes
from cornserve.task.base import UnitTask
from cornserve.task.errors import TaskDefinitionError, TaskError, TaskRegistryError
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskOutput, as_model
from cornserve.task.library import load_task_library, loaded_libraries
from cornserve.task.registry import deserialize_task, serialize_task

if TYPE_CHECKING:
    from cornserve.sidecar import Sidecar

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


class StartupError(RuntimeError):
    """The executor could not become ready (bad task, missing library or handler, no sidecar)."""


def error_text(exc: BaseException) -> str:
    """`"<Type>: <message>"`, the form the dispatcher relays to the user."""
    return f"{type(exc).__name__}: {exc}"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _answer_error(status: int, message: str, retry_after: str | None = None) -> Answer:
    return Answer(status, json.dumps({"error": message}).encode(), retry_after)


def _response(answer: Answer) -> web.Response:
    """A channel-shaped answer as the HTTP response (the same status, body and Retry-After)."""
    headers = {"Retry-After": answer.retry_after} if answer.retry_after is not None else None
    return web.Response(
        body=answer.body, status=answer.status, content_type="application/json", headers=headers
    )


class ExecutorServer:
    """One executor: HTTP endpoints, the handler, and the connections it needs."""

    def __init__(self, config: PythonExecutorSettings) -> None:
        self.config = config
        self.state = "starting"
        self.in_flight = 0
        self.served = 0
        self.failed = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._nc: Client | None = None
        self._sync: TaskLibrarySync | None = None
        self._ctx: ExecutorContext | None = None
        self._handler: Handler | None = None
        self._descriptor: PythonExecutorDescriptor[Any] | None = None
        self._item_type: Any = None
        """The stream item type when the task's output streams (else None: one output per call)."""
        self._channel: ChannelServer | None = None
        self._runner: web.AppRunner | None = None
        self._phase = "starting"
        self.app = web.Application(middlewares=[server_span_middleware()])
        self.app.router.add_get(HEALTH_PATH, self.on_health)
        self.app.router.add_get("/info", self.on_info)
        self.app.router.add_get("/metrics", metrics_route)
        self.app.router.add_post(INVOKE_PATH, self.on_invoke)

    # ----- lifecycle -------------------------------------------------------------------------------

    async def start_http(self) -> None:
        """Open the HTTP port (health answers 503 until `initialize` finishes)."""
        # handler_cancellation: when the dispatcher gives up on a graph it closes the connection, and
        # the handler (e.g. waiting on a sidecar recv that will never come) must stop with it.
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            shutdown_timeout=self.config.drain_timeout_s,
            handler_cancellation=True,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        logger.info(
            "executor %s listening on http://%s:%d",
            self.config.executor_id,
            self.config.host,
            self.config.port,
        )
        if self.config.channel_port is not None:
            # Same host as HTTP, no credentials, like the HTTP port (docs/security.md); refuses with 503 until ready.
            self._channel = ChannelServer(self, self.config.channel_max_frame_bytes)
            await self._channel.start(self.config.host, self.config.channel_port)
            logger.info(
                "executor %s: invocation channel on %s:%d",
                self.config.executor_id,
                self.config.host,
                self.config.channel_port,
            )

    async def initialize(self) -> None:
        """Connect, load the task and its handler, connect the sidecar client; then become ready."""
        timeout = self.config.startup_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._initialize(time.monotonic() + timeout)
        except TimeoutError:
            raise StartupError(f"not ready within {timeout:.0f} s; stuck {self._phase}") from None

    async def _initialize(self, deadline: float) -> None:
        self._phase = f"connecting to NATS at {self.config.nats_url}"
        self._nc = await connect_nats(
            self.config.nats_url,
            name=f"cornserve-executor-{self.config.executor_id}",
            creds=self.config.nats_creds,
        )
        self._phase = "loading task libraries"
        self._sync = TaskLibrarySync(self._nc, self._load_library)
        await self._sync.start()
        self._phase = "rebuilding the task"
        task = await self._load_task(min(deadline, time.monotonic() + self.config.library_wait_s))
        descriptor = task.descriptor
        if not isinstance(descriptor, PythonExecutorDescriptor):
            raise StartupError(
                f"{type(task).__name__} is executed by {type(descriptor).__name__}, not a PythonExecutorDescriptor"
            )
        handler = descriptor.resolve_handler(task)
        if not (inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler)):
            raise StartupError(
                f"handler {descriptor.handler!r} of {type(task).__name__} must be an async function "
                "(async def ..., returning the output or yielding stream items)"
            )
        self._descriptor = descriptor
        self._handler = handler
        self._item_type = stream_item_type(task.output_cls())
        self._ctx = ExecutorContext(
            task=task, executor_id=self.config.executor_id, sidecar_ranks=list(self.config.sidecar_ranks)
        )
        if self.config.sidecar_ranks:
            rank = self.config.sidecar_ranks[0]
            self._phase = f"connecting to sidecar rank {rank}"
            from cornserve.sidecar import Sidecar

            # Held by the context before connecting, so stop() closes it even if connecting fails.
            self._ctx._sidecar = Sidecar(
                rank,
                self.config.nats_url,
                timeout=descriptor.sidecar_timeout_s,
                nats_creds=self.config.nats_creds,
            )
            await self._connect_sidecar(self._ctx._sidecar, deadline)
        self.state = "ready"
        logger.info(
            "executor %s ready: %s (handler %s, sidecar ranks %s)",
            self.config.executor_id,
            task.deployment_key,
            descriptor.handler,
            self.config.sidecar_ranks,
        )

    def _load_library(self, record: TaskLibraryRecord) -> None:
        if loaded_libraries().get(record.name) == record.sha256:
            return  # the watcher replays what start() already loaded
        loaded = load_task_library(record.name, record.source)
        logger.info(
            "task library %r loaded (sha256 %s): %s",
            loaded.name,
            loaded.sha256[:12],
            ", ".join(loaded.unit_tasks),
        )

    async def _load_task(self, deadline: float) -> UnitTask[Any, Any]:
        """Rebuild the task; an unknown class may be a library not yet visible, so refresh until the deadline."""
        assert self._sync is not None
        while True:
            try:
                return deserialize_task(self.config.task)
            except TaskRegistryError as exc:
                if time.monotonic() + 0.5 >= deadline:
                    raise StartupError(f"cannot rebuild the task: {exc}") from exc
                logger.info("task class not registered yet (%s); refreshing task libraries", exc)
            except TaskError as exc:
                raise StartupError(f"cannot rebuild the task: {exc}") from exc
            await asyncio.sleep(0.5)
            await self._sync.refresh()

    @staticmethod
    async def _connect_sidecar(sidecar: Sidecar, deadline: float) -> None:
        """Connect, waiting for a sidecar server that is still starting (until the deadline)."""
        from cornserve.sidecar.errors import SidecarTimeout, SidecarUnavailable

        while True:
            try:
                await sidecar.connect()
                return
            except (SidecarUnavailable, SidecarTimeout) as exc:
                if time.monotonic() + 0.5 >= deadline:
                    raise StartupError(f"sidecar rank {sidecar.rank} is not reachable: {exc}") from exc
                logger.info("waiting for sidecar rank %d: %s", sidecar.rank, exc)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish (with a deadline), then close everything."""
        self.state = "stopping"
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                await self._idle.wait()
        except TimeoutError:
            logger.warning(
                "executor %s: %d request(s) still running after %.0f s; cancelling them",
                self.config.executor_id,
                self.in_flight,
                self.config.drain_timeout_s,
            )
        if self._channel is not None:
            self._channel.close()  # calls still running past the drain are cancelled, as HTTP's are
            try:
                await self._channel.wait_closed(5.0)
            except TimeoutError:
                logger.warning("the invocation channel's listener did not close within 5 s")
        if self._runner is not None:
            await self._runner.cleanup()
        if self._ctx is not None and self._ctx._sidecar is not None:
            try:
                async with asyncio.timeout(10):
                    await self._ctx._sidecar.close()
            except Exception:
                logger.exception("closing the sidecar client failed")
        if self._sync is not None:
            await self._sync.stop()
        if self._nc is not None:  # bounded, and a lost NATS is one warning (cornserve.runtime.natsstop)
            await current_budget(f"executor {self.config.executor_id}").close(self._nc)
        logger.info("executor %s stopped", self.config.executor_id)

    # ----- endpoints -------------------------------------------------------------------------------

    async def on_health(self, request: web.Request) -> web.Response:
        """200 once ready; 503 while starting or stopping."""
        body: dict[str, Any] = {
            "status": "ok" if self.state == "ready" else self.state,
            "executor_id": self.config.executor_id,
            "in_flight": self.in_flight,
        }
        return web.json_response(body, status=200 if self.state == "ready" else 503)

    async def on_info(self, request: web.Request) -> web.Response:
        """What this executor runs and how busy it has been."""
        ctx = self._ctx
        return web.json_response(
            {
                "executor_id": self.config.executor_id,
                "state": self.state,
                "pid": os.getpid(),
                "task": serialize_task(ctx.task) if ctx else self.config.task,
                "task_key": ctx.task.deployment_key if ctx else None,
                "handler": self._descriptor.handler if self._descriptor else None,
                "sidecar_ranks": self.config.sidecar_ranks,
                "in_flight": self.in_flight,
                "served": self.served,
                "failed": self.failed,
            }
        )

    async def on_invoke(self, request: web.Request) -> web.StreamResponse:
        """Run one invocation: a JSON output, or an ndjson stream of items."""
        refused = self.admit()
        if refused is not None:
            return _response(refused)
        try:
            try:
                invocation = self._parse(await request.read())
            except _BadRequest as exc:
                return _error(400, str(exc))
            if self._item_type is None:
                return _response(await self._run_unary(invocation))
            return await self._run_stream(request, invocation)
        except asyncio.CancelledError:
            # The caller went away (e.g. the dispatcher cancelled the graph after another task failed).
            logger.info("invocation of %s cancelled: the client disconnected", self._task_name())
            raise
        finally:
            self.release()

    def _task_name(self) -> str:
        return self._ctx.task.display_name() if self._ctx is not None else "?"

    # ----- the invocation channel (`cornserve.executor.channel`) -----------------------------------

    def admit(self) -> Answer | None:
        """Count an invocation in flight, or the refusal to answer at once (503 not ready, 429 full)."""
        if self.state != "ready":
            return _answer_error(503, f"executor {self.config.executor_id} is {self.state}")
        if self.in_flight >= self.config.max_in_flight:  # bounded: refuse at once rather than queue
            message = f"executor {self.config.executor_id} is running {self.in_flight} invocations (--max-in-flight)"
            return _answer_error(429, message, retry_after="1")
        self.in_flight += 1
        self._idle.clear()
        return None

    def release(self) -> None:
        """Count an admitted invocation out."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def answer(self, meta: CallMeta, body: bytes) -> Answer:
        """One admitted channel call: what ``POST /invoke`` would answer, in a server span like its own."""
        attributes = {
            "http.request.method": "POST",
            "http.route": INVOKE_PATH,
            "cornserve.transport": "channel",
        }
        with server_span(f"POST {INVOKE_PATH}", meta.trace, attributes) as current:
            try:
                answer = await self._answer(meta, body)
            except asyncio.CancelledError:
                logger.info(
                    "invocation of %s cancelled: the caller cancelled it on the channel", self._task_name()
                )
                raise
            set_attributes({"http.response.status_code": answer.status}, current)
            if answer.status >= 500:
                mark_error(f"HTTP {answer.status}", current)
            return answer

    async def _answer(self, meta: CallMeta, body: bytes) -> Answer:
        if meta.path != INVOKE_PATH:
            return _answer_error(404, f"the invocation channel serves {INVOKE_PATH}, not {meta.path}")
        try:
            invocation = self._parse(body)
        except _BadRequest as exc:
            return _answer_error(400, str(exc))
        if self._item_type is not None:
            return _answer_error(
                400, f"{invocation.task.display_name()} streams: call POST {INVOKE_PATH} over HTTP"
            )
        return await self._run_unary(invocation)

    def _parse(self, raw: bytes) -> TaskInvocation:
        assert self._ctx is not None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"the request body is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("task"), dict):
            raise _BadRequest(
                'the request body must be a task invocation: {"task", "task_input", "task_output"}'
            )
        try:
            invocation = TaskInvocation.model_validate(data)
        except (ValidationError, TaskError, TypeError, ValueError) as exc:
            raise _BadRequest(f"invalid task invocation: {exc}") from None
        expected = self._ctx.task.deployment_key
        if invocation.task.deployment_key != expected:
            raise _BadRequest(
                f"this executor runs {expected}, not {invocation.task.deployment_key} "
                f"({invocation.task.display_name()})"
            )
        return invocation

    def _attributes(self) -> None:
        assert self._ctx is not None
        task = self._ctx.task
        set_attributes(
            {"cornserve.task_class": type(task).__name__, "cornserve.deployment_key": task.deployment_key}
        )

    async def _run_unary(self, invocation: TaskInvocation) -> Answer:
        """Call the handler for one output: 200 with its JSON, or 500 with the failure's text."""
        try:
            output = self._check_output(await self._handler_result(invocation))
        except Exception as exc:
            return self._failed(exc)
        self.served += 1
        return Answer(200, json.dumps(output.model_dump(mode="json")).encode())

    async def _run_stream(self, request: web.Request, invocation: TaskInvocation) -> web.StreamResponse:
        assert self._descriptor is not None and self._item_type is not None
        try:
            result = await self._handler_result(invocation)
        except Exception as exc:
            return _response(self._failed(exc))
        return await self._stream(request, result, self._item_type, self._descriptor.invoke_timeout_s)

    async def _handler_result(self, invocation: TaskInvocation) -> Any:
        """The handler's result for `invocation` (a coroutine's awaited), within the descriptor's timeout.

        Overrunning it (or the handler's own TimeoutError) raises a TimeoutError naming the task.
        """
        assert self._ctx is not None and self._handler is not None and self._descriptor is not None
        timeout = self._descriptor.invoke_timeout_s
        self._attributes()
        try:
            async with asyncio.timeout(timeout):
                result: Any = self._handler(self._ctx, invocation)
                if inspect.isawaitable(result):
                    result = await result
                return result
        except TimeoutError:
            raise TimeoutError(
                f"{self._ctx.task.display_name()} did not finish within {timeout:.0f} s"
            ) from None

    def _check_output(self, result: Any) -> TaskOutput:
        assert self._ctx is not None
        output_cls = self._ctx.task.output_cls()
        output = as_model(result, output_cls)
        if output is not None:
            return output
        raise TaskDefinitionError(
            f"handler {self._descriptor.handler if self._descriptor else '?'} returned "
            f"{type(result).__name__}, not {output_cls.__name__}"
        )

    def _failed(self, exc: BaseException) -> Answer:
        self.failed += 1
        logger.warning("invocation failed: %s", error_text(exc), exc_info=exc)
        return _answer_error(500, error_text(exc))

    async def _stream(
        self, request: web.Request, result: Any, item_type: Any, timeout: float
    ) -> web.StreamResponse:
        if not hasattr(result, "__aiter__"):
            return _response(
                self._failed(
                    TaskDefinitionError(
                        f"the output of {self._ctx.task.display_name() if self._ctx else '?'} streams, so its "
                        "handler must be an async generator (or return an async iterator), not return "
                        f"{type(result).__name__}"
                    )
                )
            )
        iterator: AsyncIterator[Any] = aiter(result)
        adapter = item_adapter(item_type)
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
        failed = False
        try:
            async with asyncio.timeout(timeout):
                async for item in iterator:
                    line = adapter.dump_json(adapter.validate_python(item)) + b"\n"
                    await response.write(line)
        except (ConnectionResetError, asyncio.CancelledError):
            logger.info("client went away mid-stream; closing the handler's stream")
            raise
        except TimeoutError:
            failed = True
            await self._write_error(
                response, f"TimeoutError: the stream did not finish within {timeout:.0f} s"
            )
        except Exception as exc:
            failed = True
            logger.warning("stream failed: %s", error_text(exc), exc_info=exc)
            await self._write_error(response, error_text(exc))
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if failed:
            self.failed += 1
        else:
            self.served += 1
        await response.write_eof()
        return response

    @staticmethod
    async def _write_error(response: web.StreamResponse, message: str) -> None:
        await response.write(json.dumps({"error": message}).encode() + b"\n")


class _BadRequest(Exception):
    """A request the executor refuses with 400."""
