"""One dispatcher replica: the `cornserve.dispatch.invoke` micro endpoint and what it needs.

A replica loads uploaded task libraries (so it can rebuild any registered task class), follows the
resource manager's deployments, and serves graphs from the shared queue group. On shutdown it
stops taking graphs, lets running ones finish for a grace period, then fails the rest with a typed
error (and ends open streams with an error message) so no caller waits on a replica that is gone.
While a graph runs, and while its stream is relayed, the replica sends the caller keepalives
(`keepalive.py`), so a replica that is killed outright is noticed within seconds too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import nats.errors
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service
from pydantic import TypeAdapter, ValidationError

import cornserve.task.builtins  # noqa: F401  - registers the built-in unit tasks and descriptors
from cornserve.bus.control import (
    DISPATCH_INVOKE,
    DISPATCH_QUEUE_GROUP,
    DISPATCHER_SERVICE_NAME,
    InvokeReply,
    InvokeRequest,
    TaskLibraryRecord,
)
from cornserve.bus.error_codec import describe_invalid, request_id_of, respond_error
from cornserve.bus.invoke_channel import DEFAULT_MAX_FRAME_BYTES
from cornserve.bus.kv import TaskLibrarySync
from cornserve.bus.micro import ServiceFault, respond_fault
from cornserve.bus.reply_parts import split_reply
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.dispatcher import __version__, faults
from cornserve.dispatcher.cancel import CancelBoard
from cornserve.dispatcher.channels import ExecutorChannels
from cornserve.dispatcher.deployments import DeploymentCache
from cornserve.dispatcher.forwards import drop_forwards
from cornserve.dispatcher.graph import GraphRunner
from cornserve.dispatcher.keepalive import ACK_DELAY_S, Keepalive
from cornserve.dispatcher.metrics import watch_load
from cornserve.dispatcher.relay import StreamRelay
from cornserve.dispatcher.tables import ExecutorTables
from cornserve.runtime.logging import set_request_id
from cornserve.runtime.natsstop import nats_step
from cornserve.runtime.tracing import Attributes, mark_error, server_span
from cornserve.task import TaskError, TaskInvocation, TaskRegistryError
from cornserve.task.library import load_task_library

logger = logging.getLogger(__name__)

T = TypeVar("T")

_INVOCATIONS = TypeAdapter(list[TaskInvocation])
REPLY_HEADER_ROOM = 4096
"""Bytes of `max_payload` kept for a reply's headers (the server counts them in the limit)."""


def parse_invocations(raw: list[dict[str, Any]]) -> list[TaskInvocation]:
    """Rebuild the recorded invocations; TaskRegistryError means a task class is not loaded (yet)."""
    try:
        return _INVOCATIONS.validate_python(raw)
    except TaskRegistryError:
        raise
    except ValidationError as exc:
        raise faults.bad_request(f"invalid invocations: {describe_invalid(exc)}") from None
    except (TaskError, TypeError, ValueError, LookupError) as exc:
        raise faults.bad_request(f"invalid invocations: {exc}") from None


@dataclass(eq=False)
class DispatcherService:
    """State and handler of one dispatcher replica."""

    nc: Client
    """The NATS connection (owned by the caller, who closes it after `stop`)."""
    replica_id: str
    route_timeout_s: float = field(default=10.0, kw_only=True)
    state_timeout_s: float = field(default=3.0, kw_only=True)
    resync_interval_s: float = field(default=30.0, kw_only=True)
    drain_timeout_s: float = field(default=30.0, kw_only=True)
    ack_delay_s: float = field(default=ACK_DELAY_S, kw_only=True)
    """How long a graph runs before its caller gets the acknowledgement (`keepalive.py`); 0: at once."""
    max_graphs: int = field(default=1024, kw_only=True)
    """Graphs this replica runs at once, relayed streams included; more are refused with 429 at once."""
    _session: aiohttp.ClientSession | None = field(default=None, init=False)
    _tasklibs: TaskLibrarySync | None = field(default=None, init=False)
    _deployments: DeploymentCache | None = field(default=None, init=False)
    _graphs: GraphRunner | None = field(default=None, init=False)
    _tables: ExecutorTables | None = field(default=None, init=False)
    executor_tables: bool = field(default=True, kw_only=True)
    """Route from task managers' published tables (`tables.py`); False: a `route` request per invocation."""
    executor_channels: bool = field(default=True, kw_only=True)
    """Unary calls over executors' invocation channels where advertised (`channels.py`); False: HTTP only."""
    channel_max_frame_bytes: int = field(default=DEFAULT_MAX_FRAME_BYTES, kw_only=True)
    _channels: ExecutorChannels | None = field(default=None, init=False)
    _service: Service | None = field(default=None, init=False)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    """One task per graph being executed (parse, run, reply); micro runs callbacks one at a time."""
    _relays: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _background: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _keepalives: set[Keepalive] = field(default_factory=set, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    """Set while no graph is running (the drain waits for it)."""
    _closing: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _runs: set[asyncio.Future[Any]] = field(default_factory=set, init=False)
    """Graph runs in progress (`_unless_closing`): a forced close cancels them."""
    _cancels: CancelBoard | None = field(default=None, init=False)
    """Graphs (and their relays) by cancel id: a caller's InvokeCancel aborts them (`cancel.py`)."""
    _refused: int = field(default=0, init=False)
    """Graphs refused for `max_graphs` since the last warning about it (one warning per 10 s, not one each)."""
    _refused_logged_at: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        self._idle.set()
        watch_load(self.load)

    def load(self) -> dict[str, int]:
        """What this replica runs now (the `data` of its micro STATS): graphs, relayed streams, cancels."""
        return {
            "graphs": len(self._handlers),
            "relays": len(self._relays),
            "cancelled": self._cancels.cancelled if self._cancels is not None else 0,
        }

    # ----- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load task libraries, follow deployments, then serve the invoke endpoint."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            read_bufsize=1 << 20,
        )
        self._tasklibs = TaskLibrarySync(self.nc, _load_library)
        await self._tasklibs.start()
        self._deployments = DeploymentCache(
            self.nc, state_timeout_s=self.state_timeout_s, resync_interval_s=self.resync_interval_s
        )
        await self._deployments.start()
        if self.executor_tables:
            self._tables = ExecutorTables(self.nc, self.replica_id)
            await self._tables.start()
        if self.executor_channels:
            self._channels = ExecutorChannels(max_frame_bytes=self.channel_max_frame_bytes)
        self._graphs = GraphRunner(
            self.nc,
            self._session,
            self._deployments,
            self._route_done,
            route_timeout_s=self.route_timeout_s,
            on_abandoned=self._drop_forwards,
            tables=self._tables,
            channels=self._channels,
        )
        self._cancels = CancelBoard(self.nc)
        await self._cancels.start()
        self._service = await add_service(
            self.nc,
            name=DISPATCHER_SERVICE_NAME,
            version=__version__,
            description="Cornserve task dispatcher: executes recorded task graphs on executors",
            metadata={"replica_id": self.replica_id},
            stats_handler=lambda _endpoint: self.load(),
        )
        await self._service.add_endpoint(
            name="invoke",
            subject=DISPATCH_INVOKE,
            queue_group=DISPATCH_QUEUE_GROUP,
            handler=self._on_invoke,
            metadata={"replica_id": self.replica_id},
        )
        logger.info(
            "dispatcher replica %s serving %s (queue group %s)",
            self.replica_id,
            DISPATCH_INVOKE,
            DISPATCH_QUEUE_GROUP,
        )

    async def stop(self) -> None:
        """Stop taking graphs, drain running ones (bounded), fail the rest, then close everything."""
        if self._service is not None:
            await nats_step("stopping the micro service", self._service.stop)
        if not await _wait_event(self._idle, self.drain_timeout_s):
            logger.warning(
                "%d graph(s) and %d stream(s) still running after %g s; failing them",
                len(self._handlers),
                len(self._relays),
                self.drain_timeout_s,
            )
        self._closing.set()  # running graphs now reply with a typed error
        for run in list(self._runs):
            run.cancel()
        for task in list(self._relays):
            task.cancel()  # relays end their streams with an error message
        if not await _wait_event(self._idle, 10.0):
            for task in list(self._handlers):
                task.cancel()
        await asyncio.gather(*self._handlers, *self._relays, return_exceptions=True)
        for keepalive in list(self._keepalives):
            keepalive.cancel()
        if self._cancels is not None:
            await self._cancels.stop()
        if self._tables is not None:
            await self._tables.stop()
        if self._deployments is not None:
            await self._deployments.stop()
        if self._tasklibs is not None:
            await self._tasklibs.stop()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._channels is not None:
            await self._channels.close()
        logger.info("dispatcher replica %s stopped", self.replica_id)

    # ----- invoke ----------------------------------------------------------------------------------

    async def _on_invoke(self, msg: Request) -> None:
        """Micro handler: validate the envelope, then execute the graph in its own task."""
        try:
            req = InvokeRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            message = f"invalid request: {describe_invalid(exc)}"
            await respond_error(msg, request_id_of(msg.data), 400, faults.BAD_REQUEST, message)
            return
        if self._closing.is_set():
            await respond_fault(msg, req.request_id, faults.shutting_down(self.replica_id))
            return
        if self._cancels is not None and self._cancels.was_cancelled(req.cancel_id):
            logger.info(
                "graph %s was cancelled by its caller before it arrived; not running it", req.request_id
            )
            return
        running = len(self._handlers) + len(self._relays)
        if running >= self.max_graphs:
            self._note_refusal(running)
            await respond_fault(
                msg, req.request_id, faults.dispatcher_overloaded(self.replica_id, running, self.max_graphs)
            )
            return
        keepalive = Keepalive(
            self.nc,
            req.keepalive_subject,
            req.request_id,
            self.replica_id,
            req.keepalive_interval_s,
            self.ack_delay_s,
        )
        self._keepalives.add(keepalive)
        await keepalive.start()  # the acknowledgement follows unless the graph replies first
        handler = asyncio.create_task(self._serve(msg, req, keepalive), name=f"graph-{req.request_id}")
        self._track(self._handlers, handler)

        def stop_keepalive_if_cancelled(task: asyncio.Task[None]) -> None:
            if task.cancelled():  # perhaps before it ran (then `_serve` never released its keepalive)
                keepalive.cancel()
                self._keepalives.discard(keepalive)

        handler.add_done_callback(stop_keepalive_if_cancelled)
        if self._cancels is not None:
            self._cancels.track(req.cancel_id, handler)

    async def _serve(self, msg: Request, req: InvokeRequest, keepalive: Keepalive) -> None:
        set_request_id(req.request_id)  # this task is the graph run: its log lines carry the id
        attributes: Attributes = {
            "cornserve.request_id": req.request_id,
            "cornserve.replica_id": self.replica_id,
            "cornserve.invocations": len(req.invocations),
        }
        # A child of the gateway's graph submission when the graph message carried its traceparent.
        with server_span("graph.execute", msg.headers, attributes):
            await self._serve_graph(msg, req, keepalive)

    async def _serve_graph(self, msg: Request, req: InvokeRequest, keepalive: Keepalive) -> None:
        try:
            try:
                reply = await self.invoke(req, keepalive)
            except ServiceFault as fault:
                logger.info(
                    "graph %s failed (%d %s): %s", req.request_id, fault.code, fault.error, fault.message
                )
                mark_error(f"{fault.error}: {fault.message}")
                await respond_fault(msg, req.request_id, fault)
                return
            except Exception as exc:
                mark_error(f"{type(exc).__name__}: {exc}")
                logger.exception("graph %s failed unexpectedly", req.request_id)
                await respond_error(msg, req.request_id, 500, "internal", f"{type(exc).__name__}: {exc}")
                return
            await self._respond(msg, req, reply.model_dump_json().encode())
        finally:
            self._release(keepalive)

    async def _respond(self, msg: Request, req: InvokeRequest, data: bytes) -> None:
        """Send the reply: in one message, in ordered parts when the caller takes them, else `output_too_large`.

        A reply larger than one message goes as parts on the caller's `reply_parts_subject` when it
        named one and the reply is within its `max_reply_bytes` (`cornserve.bus.reply_parts`): the
        graph ran once and its answer is not lost. Otherwise the caller gets the typed error, never
        silence (which it would take for a dead replica and run the graph again).
        """
        limit = max(self.nc.max_payload - REPLY_HEADER_ROOM, 0)
        if len(data) <= limit:
            try:
                await msg.respond(data)
                return
            except nats.errors.MaxPayloadError:
                pass
        accepted = req.max_reply_bytes
        if req.reply_parts_subject is not None and accepted is not None and limit > 0:
            if len(data) <= accepted:
                parts = split_reply(data, limit)
                for headers, chunk in parts:
                    await self.nc.publish(req.reply_parts_subject, chunk, headers=headers)
                logger.info(
                    "graph %s: replied %d bytes in %d parts (more than one message carries)",
                    req.request_id,
                    len(data),
                    len(parts),
                )
                return
            fault = faults.output_too_large(len(data), accepted, "its caller accepts")
        else:
            fault = faults.output_too_large(len(data), limit, "the message bus carries")
        logger.warning("graph %s: %s", req.request_id, fault.message)
        await respond_fault(msg, req.request_id, fault)

    def _note_refusal(self, running: int) -> None:
        """Count a graph refused for `max_graphs`; warn at most every 10 s, with the count."""
        self._refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refused_logged_at >= 10.0:
            logger.warning(
                "refused %d graph(s) with 429 overloaded: %d running, the limit (--max-graphs %d)",
                self._refused,
                running,
                self.max_graphs,
            )
            self._refused, self._refused_logged_at = 0, now

    def _release(self, keepalive: Keepalive) -> None:
        keepalive.release()
        if keepalive.stopped:
            self._keepalives.discard(keepalive)

    async def invoke(self, req: InvokeRequest, keepalive: Keepalive | None = None) -> InvokeReply:
        """Execute one graph; the reply comes once every non-stream output (and the stream's start) is in.

        Producers of stream forwards whose output is known (`graph.Tail`) may still run then: the
        relay watches them, so the caller gets the stream's first item before they finish.

        A relayed stream holds `keepalive` until it ends, so the caller keeps hearing from this replica.
        """
        assert self._graphs is not None
        invocations = await self._parse(req.invocations)
        result = await self._unless_closing(self._graphs.run(invocations, req.timeout_s, req.stream_subject))
        if result.tail is not None and result.stream is None:
            # Nothing to relay (a stream subject without a streaming invocation): answer when all did.
            try:
                await result.tail.wait()
            except TimeoutError:
                result.tail.cancel()
                raise faults.graph_timeout(req.timeout_s, result.tail.names) from None
        if result.stream is not None:
            assert req.stream_subject is not None
            graphs, opened = self._graphs, result.stream

            def finished() -> None:
                graphs.release(opened.routed)
                if keepalive is not None:
                    self._release(keepalive)

            if keepalive is not None:
                keepalive.hold()
            relay = StreamRelay(
                self.nc, opened, req.stream_subject, req.timeout_s, on_finish=finished, tail=result.tail
            )
            task = asyncio.create_task(relay.run(), name=f"relay-{req.request_id}")
            self._track(self._relays, task)
            if self._cancels is not None:
                self._cancels.track(req.cancel_id, task, relay.cancelled_by_caller)
        return InvokeReply(request_id=req.request_id, outputs=result.outputs)

    async def _parse(self, raw: list[dict[str, Any]]) -> list[TaskInvocation]:
        """Parse, reloading task libraries once if a class is unknown (it may have just been uploaded)."""
        try:
            return parse_invocations(raw)
        except TaskRegistryError:
            assert self._tasklibs is not None
            await self._tasklibs.refresh()
        try:
            return parse_invocations(raw)
        except TaskRegistryError as exc:
            raise faults.bad_request(f"invalid invocations: {exc}") from None

    async def _unless_closing(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro`, failing it with a typed error if the replica is forced to close first.

        The run is a task of its own that `stop` cancels once it forces the close (rather than a
        second task per graph waiting on the closing event beside it). Cancelling the caller
        cancels the run too, and the caller resumes only once the run has finished.
        """
        if self._closing.is_set():
            coro.close()
            raise faults.shutting_down(self.replica_id)
        run = asyncio.ensure_future(coro)
        self._runs.add(run)
        caller = asyncio.current_task()
        cancels = caller.cancelling() if caller is not None else 0
        try:
            result = await run
            if caller is not None and caller.cancelling() > cancels:
                raise asyncio.CancelledError  # the run finished despite our caller's cancel: the cancel wins
            return result
        except asyncio.CancelledError:
            if (
                run.cancelled()
                and self._closing.is_set()
                and (caller is None or caller.cancelling() <= cancels)
            ):
                raise faults.shutting_down(
                    self.replica_id
                ) from None  # the close cancelled it, not our caller
            raise
        finally:
            self._runs.discard(run)

    # ----- book-keeping ----------------------------------------------------------------------------

    def _track(self, tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        tasks.add(task)
        self._idle.clear()

        def done(finished: asyncio.Task[None]) -> None:
            tasks.discard(finished)
            if not self._handlers and not self._relays:
                self._idle.set()
            if not finished.cancelled() and finished.exception() is not None:
                logger.error("%s failed", finished.get_name(), exc_info=finished.exception())

        task.add_done_callback(done)

    def _route_done(self, task_key: str, executor_id: str) -> None:
        """Tell the task manager an invocation finished (fire and forget, never blocks the caller)."""
        task = asyncio.ensure_future(TaskManagerClient(self.nc, task_key).done(executor_id))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _drop_forwards(self, by_rank: dict[int, list[str]], reason: str) -> None:
        """A graph was given up: have its sidecars free its forwards now (fire and forget, `forwards.py`)."""
        if not by_rank:
            return
        task = asyncio.ensure_future(drop_forwards(self.nc, by_rank, reason))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a background publish (RouteDone, forward drops) failed", exc_info=task.exception())


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` seconds; whether it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _load_library(record: TaskLibraryRecord) -> None:
    loaded = load_task_library(record.name, record.source)
    logger.info(
        "task library %s (sha256 %s): unit tasks %s, descriptors %s",
        record.name,
        record.sha256[:12],
        loaded.unit_tasks,
        loaded.descriptors,
    )
