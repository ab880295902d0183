"""Executing one recorded graph: resolve, route, wire, call every executor, gather.

Every invocation's executor is picked from its task manager's published table (`tables.py`), or
by the task manager itself (`route`) when the replica holds no fresh table; every DataForward is wired
to the picked executors' sidecar ranks, and all executor requests run at once: a consumer
executor waits for its forwarded data through its sidecar, so the dispatcher never orders them.
The first failure cancels everything else and becomes the graph's typed error; the deadline
covers the whole graph. Each routed invocation is reported done exactly once (to the table's
outstanding count, or to its task manager with `RouteDone`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import aiohttp
from nats.aio.client import Client

from cornserve.bus import invoke_channel as wire
from cornserve.bus.control import STREAM_PUBLISHED_HEADER, STREAM_SUBJECT_HEADER, RouteReply
from cornserve.bus.micro import NoResponders, RequestTimeout, ServiceErrorReply, ServiceFault
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.dispatcher import faults
from cornserve.dispatcher.channels import ChannelBroken, ChannelRefused, ExecutorChannels
from cornserve.dispatcher.deployments import DeploymentCache
from cornserve.dispatcher.forwards import forwards_by_rank
from cornserve.dispatcher.metrics import observe_call
from cornserve.dispatcher.tables import ExecutorTables
from cornserve.runtime.tracing import Attributes, client_span, inject_headers, set_attributes
from cornserve.task import ExecutorRequest, Stream, TaskInvocation, Unmaterialized, wire_forwards
from cornserve.task.forward import DataForward, iter_forwards
from cornserve.task.nested import nested_values
from cornserve.task.stream import is_stream_forward

logger = logging.getLogger(__name__)

ERROR_TEXT_LIMIT = 2000
"""How much of an executor's error body goes into the error message."""
ERROR_READ_LIMIT = 16 * 1024
"""How much of an executor's error body is read at all."""
CHANNEL_DEADLINE_MARGIN_S = 1.0
"""A channel call's own deadline is the graph's plus this, so the graph's timeout is what fires."""

OnDone = Callable[[str, str], None]
"""`(task_key, executor_id)`: report one routed invocation finished (publishes RouteDone)."""
OnAbandoned = Callable[[dict[int, list[str]], str], None]
"""`(forward ids by sidecar rank, reason)`: a wired graph was given up; free its forwards (`forwards.py`)."""


@dataclass
class Routed:
    """One invocation and the executor its task manager picked for it."""

    position: int
    task_key: str
    task_name: str
    route: RouteReply
    released: bool = False
    local: bool = False
    """Picked from the task manager's table (`tables.py`), not by a `route` request."""

    @property
    def where(self) -> str:
        """The executor, for messages."""
        return f"executor {self.route.executor_id} ({self.route.url})"

    def failed(self, reason: str, **details: object) -> ServiceFault:
        """The graph's error when this executor fails: the reason, with the executor's id attached."""
        return faults.executor_failed(
            self.task_name, self.position, reason, executor_id=self.route.executor_id, **details
        )


@dataclass
class OpenStream:
    """The streaming invocation's HTTP response, open and OK, for the relay to read."""

    invocation: TaskInvocation
    routed: Routed
    response: aiohttp.ClientResponse
    started: float = 0.0
    """When the call was sent (`time.monotonic`): the relay's time to first item counts from it."""

    @property
    def published(self) -> bool:
        """The executor publishes the stream's items itself (`STREAM_SUBJECT_HEADER`); the body says how it ended."""
        return self.response.headers.get(STREAM_PUBLISHED_HEADER) == "1"


@dataclass(eq=False)
class Tail:
    """Producers of stream forwards still running when the graph replied (their output is known).

    In a graph whose result streams, an invocation whose output holds nothing but forwards, one of
    them a stream forward, needs no answer before the reply: the caller gets the result stream's
    first item while that producer still produces. The relay watches the tail until it is done; a
    failure or the graph's deadline ends the stream with the error, and `abandon` frees the
    graph's forwards so the consumer's receive fails at once instead of waiting.
    """

    tasks: list[asyncio.Task[Any]]
    names: list[str]
    deadline: float
    """`time.monotonic()` by which the tail must be done (the graph's deadline)."""
    on_abandon: Callable[[str], None]
    """Frees the graph's forwards in the sidecars (`forwards.py`)."""
    abandoned: bool = False

    async def wait(self) -> None:
        """Until every tail call answered; raises the first failure as a ServiceFault (TimeoutError past the deadline)."""
        async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
            for task, name in zip(self.tasks, self.names, strict=True):
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    if not task.cancelled():
                        raise  # the waiter itself is cancelled
                    raise ServiceFault(503, "cancelled", f"{name} was stopped before it answered") from None

    def cancel(self) -> None:
        """Stop the calls still running (their connections are closed, their routes reported done)."""
        for task in self.tasks:
            task.cancel()

    def abandon(self, reason: str) -> None:
        """Give the tail up: stop its calls and free the graph's forwards now (once)."""
        self.cancel()
        if not self.abandoned:
            self.abandoned = True
            self.on_abandon(reason)


@dataclass
class GraphResult:
    """Outputs as JSON, one per invocation (None for the stream), the open stream and the tail if any."""

    outputs: list[dict[str, Any] | None]
    stream: OpenStream | None = None
    tail: Tail | None = None


@dataclass
class _Run:
    """Book-keeping of one graph run, so failures and deadlines can clean up precisely."""

    routed: dict[int, Routed] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    """Positions whose executor answered (for a stream: started streaming)."""
    stream: OpenStream | None = None
    tail: dict[int, asyncio.Task[Any]] = field(default_factory=dict)
    """Calls the reply does not wait for (`Tail`), by position."""
    deadline: float = float("inf")
    """`time.monotonic()` by which the graph must be done."""
    publish_subject: str | None = None
    """Where the streaming executor may publish the stream itself: the caller's subject when no tail can fail it."""


def executor_url(route: RouteReply, path: str) -> str:
    """The executor's base URL joined with a descriptor's request path."""
    return route.url.rstrip("/") + "/" + path.lstrip("/")


@dataclass(eq=False)
class GraphRunner:
    """Runs graphs against executors: unary calls over invocation channels where advertised, else pooled HTTP."""

    nc: Client
    session: aiohttp.ClientSession
    deployments: DeploymentCache
    on_done: OnDone
    route_timeout_s: float = field(default=10.0, kw_only=True)
    on_abandoned: OnAbandoned | None = field(default=None, kw_only=True)
    tables: ExecutorTables | None = field(default=None, kw_only=True)
    """Task managers' executor tables; None: every invocation is routed by a `route` request."""
    channels: ExecutorChannels | None = field(default=None, kw_only=True)
    """Executors' invocation channels for unary calls (`channels.py`); None: every call over HTTP."""

    async def run(
        self, invocations: Sequence[TaskInvocation], timeout_s: float, stream_subject: str | None
    ) -> GraphResult:
        """Execute the graph within `timeout_s`; raise a ServiceFault on any failure."""
        check_streams(invocations, stream_subject)
        deadline = time.monotonic() + timeout_s
        state = _Run(deadline=deadline)
        wired = False
        given_up = "its graph failed"
        tail_positions = tail_of(invocations) if stream_subject else set()
        if not tail_positions:
            state.publish_subject = stream_subject
        try:
            async with asyncio.timeout(timeout_s):
                await self._resolve(invocations)
                await self._route_all(invocations, state)
                wire_forwards(
                    invocations, [state.routed[i].route.sidecar_ranks for i in range(len(invocations))]
                )
                wired = True
                requests = [self._build(state.routed[i], inv) for i, inv in enumerate(invocations)]
                outputs = await self._call_all(invocations, requests, state, tail_positions)
                given_up = ""
        except TimeoutError:
            given_up = "its graph timed out"
            pending = [
                f"{inv.task.display_name()} at position {i}"
                for i, inv in enumerate(invocations)
                if i not in state.finished
            ]
            raise faults.graph_timeout(timeout_s, pending) from None
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                given_up = "its graph was cancelled"
            if state.stream is not None:
                state.stream.response.close()
                state.stream = None
            for task in state.tail.values():
                task.cancel()
            state.tail.clear()
            raise
        finally:
            for position, routed in state.routed.items():
                streaming = state.stream is not None and routed is state.stream.routed
                if not streaming and position not in state.tail:
                    self.release(routed)  # a tail call reports itself done when it answers
            if wired and given_up and self.on_abandoned is not None:
                # Forwards already sent for it would wait for the sidecars' TTL: free them now.
                self.on_abandoned(forwards_by_rank(invocations), given_up)
        tail = None
        if state.tail:
            on_abandoned = self.on_abandoned

            def abandon(reason: str) -> None:
                if on_abandoned is not None:
                    on_abandoned(forwards_by_rank(invocations), reason)

            positions = sorted(state.tail)
            tail = Tail(
                tasks=[state.tail[i] for i in positions],
                names=[f"{invocations[i].task.display_name()} at position {i}" for i in positions],
                deadline=deadline,
                on_abandon=abandon,
            )
        return GraphResult(outputs=outputs, stream=state.stream, tail=tail)

    def release(self, routed: Routed) -> None:
        """Report a routed invocation finished, once."""
        if not routed.released:
            routed.released = True
            if routed.local and self.tables is not None:
                self.tables.done(routed.task_key, routed.route.executor_id)
            else:
                self.on_done(routed.task_key, routed.route.executor_id)

    # ----- steps -----------------------------------------------------------------------------------

    async def _resolve(self, invocations: Sequence[TaskInvocation]) -> None:
        """Every unit task must be deployed (a miss re-queries the resource manager once)."""
        found = await self.deployments.lookup(inv.task.deployment_key for inv in invocations)
        for position, inv in enumerate(invocations):
            info = found[inv.task.deployment_key]
            if info is None and not self.deployments.synced.is_set():
                # A replica that has not caught up with the resource manager yet (it just started
                # while the RM is down) cannot tell "not deployed" from "not known yet": retryable.
                raise faults.task_unavailable(
                    inv.task.display_name(),
                    inv.task.deployment_key,
                    position,
                    "this dispatcher replica has not caught up with the resource manager yet "
                    "(the resource manager is not answering); retry shortly",
                )
            if info is None:
                raise faults.task_not_deployed(inv.task.display_name(), inv.task.deployment_key, position)
            if info.state == "failed":
                reason = f"its deployment failed: {info.message}" if info.message else "its deployment failed"
                raise faults.task_unavailable(inv.task.display_name(), info.task_key, position, reason)

    async def _route_all(self, invocations: Sequence[TaskInvocation], state: _Run) -> None:
        """Route every invocation: from the executor tables at once, else by asking its task manager.

        The table picks run first and inline; only the invocations they cannot route wait for a
        `route` request (concurrently). A graph routed from tables alone creates no task for it.
        """
        asks = [
            (position, inv)
            for position, inv in enumerate(invocations)
            if not self._pick(position, inv, state)
        ]
        await _first_fault([self._route(position, inv, state) for position, inv in asks])

    def _pick(self, position: int, inv: TaskInvocation, state: _Run) -> bool:
        """Route from the task manager's executor table (no round trip); False: it has no pick."""
        key = inv.task.deployment_key
        picked = self.tables.pick(key) if self.tables is not None else None
        if picked is None:
            return False
        with client_span("task.route", _task_attributes(inv, position)):
            state.routed[position] = Routed(
                position=position, task_key=key, task_name=inv.task.display_name(), route=picked, local=True
            )
            # `table`: picked from the task manager's executor table (no tm.route span).
            set_attributes({"cornserve.executor_id": picked.executor_id, "cornserve.route_source": "table"})
        return True

    async def _route(self, position: int, inv: TaskInvocation, state: _Run) -> None:
        """Ask the invocation's task manager for an executor (a `route` request)."""
        with client_span("task.route", _task_attributes(inv, position)):
            await self._route_untraced(position, inv, state)
            set_attributes(
                {
                    "cornserve.executor_id": state.routed[position].route.executor_id,
                    "cornserve.route_source": "task_manager",
                }
            )

    async def _route_untraced(self, position: int, inv: TaskInvocation, state: _Run) -> None:
        name, key = inv.task.display_name(), inv.task.deployment_key
        tm = TaskManagerClient(self.nc, key)
        subject = tm.subject("route")
        try:
            reply = await tm.route(self.route_timeout_s)
        except NoResponders:
            raise faults.task_unavailable(
                name, key, position, f"its task manager is not running (no responders on {subject})"
            ) from None
        except RequestTimeout:
            raise faults.task_unavailable(
                name,
                key,
                position,
                f"its task manager did not answer {subject} within {self.route_timeout_s:g} s",
            ) from None
        except ServiceErrorReply as exc:
            raise faults.task_unavailable(
                name, key, position, f"its task manager could not route it ({exc.code}): {exc.error.message}"
            ) from None
        state.routed[position] = Routed(position=position, task_key=key, task_name=name, route=reply)

    def _build(self, routed: Routed, inv: TaskInvocation) -> ExecutorRequest:
        descriptor = inv.task.descriptor
        try:
            req = descriptor.to_request(inv.task, inv)
        except Exception as exc:
            raise faults.executor_failed(
                routed.task_name,
                routed.position,
                f"its descriptor {type(descriptor).__name__} could not build the executor request: "
                f"{type(exc).__name__}: {exc}",
            ) from None
        if req.stream != isinstance(inv.task_output, Stream):
            kind = "a stream" if isinstance(inv.task_output, Stream) else "a single response"
            raise faults.executor_failed(
                routed.task_name,
                routed.position,
                f"its descriptor {type(descriptor).__name__} built a request with stream={req.stream}, "
                f"but the task's output is {kind}",
            )
        return req

    async def _call_all(
        self,
        invocations: Sequence[TaskInvocation],
        requests: list[ExecutorRequest],
        state: _Run,
        tail_positions: set[int],
    ) -> list[dict[str, Any] | None]:
        """Call every executor at once; return when all but the tail answered (any failure first fails all)."""
        outputs: list[dict[str, Any] | None] = [None] * len(invocations)

        async def call(position: int) -> None:
            output = await self._call(
                invocations[position], state.routed[position], requests[position], state
            )
            if position not in tail_positions:
                outputs[position] = output

        if len(invocations) == 1 and not tail_positions:
            # One call is awaited inline: a task and `asyncio.wait` would only add loop turns.
            try:
                outputs[0] = await self._call(invocations[0], state.routed[0], requests[0], state)
            except Exception as exc:
                raise _fault_of([exc]) from None
            return outputs
        for position in tail_positions:
            # Known before the call: the recorded forwards, wired (`tail_of` checked there is nothing else).
            outputs[position] = invocations[position].task_output.model_dump(mode="json")
        tasks = {i: asyncio.create_task(call(i)) for i in range(len(invocations))}
        front = {tasks[i] for i in tasks if i not in tail_positions}
        try:
            pending = set(tasks.values())
            while front & pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
                if failed:
                    raise _fault_of(failed)
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise
        state.tail = {i: tasks[i] for i in tail_positions}
        return outputs

    async def _call(
        self, inv: TaskInvocation, routed: Routed, req: ExecutorRequest, state: _Run
    ) -> dict[str, Any] | None:
        """Send one executor request; a streamed response is left open in `state.stream`.

        Its client span ends when the answer is in, or for a stream when the response opened (the
        relay's items follow outside it).
        """
        attributes = {
            **_task_attributes(inv, routed.position),
            "cornserve.executor_id": routed.route.executor_id,
        }
        with client_span("task.call", attributes):
            return await self._call_untraced(inv, routed, req, state)

    async def _call_untraced(
        self, inv: TaskInvocation, routed: Routed, req: ExecutorRequest, state: _Run
    ) -> dict[str, Any] | None:
        started = time.monotonic()
        ok = False
        try:
            channel = self._channel_body(routed, req)
            if channel is not None:
                raw = await self._call_channel(routed, req, channel, state)
                output = self._parse_output(inv, routed, raw)
                state.finished.add(routed.position)
                ok = True
                return output
            url = executor_url(routed.route, req.path)
            headers = inject_headers()
            if req.stream and state.publish_subject is not None:
                headers[STREAM_SUBJECT_HEADER] = state.publish_subject
            try:
                response = await self.session.request(req.method, url, json=req.body, headers=headers)
            except aiohttp.ClientConnectorError as exc:
                raise self._refused(routed, exc) from None
            except aiohttp.ClientError as exc:
                raise routed.failed(f"could not reach {routed.where}: {type(exc).__name__}: {exc}") from None
            if req.stream:
                if response.status >= 400:
                    async with response:
                        raise await _status_failure(routed, response)
                state.stream = OpenStream(invocation=inv, routed=routed, response=response, started=started)
                state.finished.add(routed.position)
                ok = True
                return None
            async with response:
                if response.status >= 400:
                    raise await _status_failure(routed, response)
                try:
                    raw = await response.read()
                except aiohttp.ClientError as exc:
                    raise routed.failed(
                        f"{routed.where} broke off its response: {type(exc).__name__}: {exc}"
                    ) from None
            output = self._parse_output(inv, routed, raw)
            state.finished.add(routed.position)
            ok = True
            return output
        finally:
            observe_call(routed.task_name, started, ok)
            if not req.stream:
                self.release(routed)

    def _channel_body(self, routed: Routed, req: ExecutorRequest) -> bytes | None:
        """The call's body when it goes over the executor's invocation channel; None: over HTTP.

        A unary POST with a body, to an executor that advertises a channel, that fits one frame.
        """
        if self.channels is None or routed.route.channel is None or req.stream or req.method != "POST":
            return None
        if req.body is None:
            return None
        body = json.dumps(req.body).encode()
        if len(body) > self.channels.max_frame_bytes - 2 * wire.MAX_META_BYTES:
            return None  # HTTP answers an oversized body as it always did
        return body

    async def _call_channel(self, routed: Routed, req: ExecutorRequest, body: bytes, state: _Run) -> bytes:
        """One unary call over the invocation channel: the answer's body, or the fault HTTP would give."""
        assert self.channels is not None and routed.route.channel is not None
        # The graph's own deadline fires first (a graph timeout); this one is the backstop of this wait.
        timeout = max(0.0, state.deadline - time.monotonic()) + CHANNEL_DEADLINE_MARGIN_S
        try:
            reply = await self.channels.call(routed.route.channel, req.path, body, inject_headers(), timeout)
        except ChannelRefused as exc:
            raise self._refused(routed, exc) from None
        except ChannelBroken as exc:
            raise routed.failed(f"could not reach {routed.where}: {type(exc).__name__}: {exc}") from None
        except TimeoutError:
            raise routed.failed(f"{routed.where} did not answer within the graph's deadline") from None
        if reply.status >= 400:
            raise _status_fault(
                routed, reply.status, reply.body[:ERROR_READ_LIMIT], _reason(reply.status), reply.retry_after
            )
        return reply.body

    def _refused(self, routed: Routed, exc: Exception) -> ServiceFault:
        """The fault of a call that reached nothing (the connection was refused)."""
        if not routed.local or self.tables is None:
            return routed.failed(f"could not reach {routed.where}: {type(exc).__name__}: {exc}")
        # The table named an executor that is gone (its process, or its task manager, died
        # since): nothing reached it, and its task manager says what is up from now on.
        self.tables.drop(routed.task_key, routed.route.executor_id)
        return faults.task_unavailable(
            routed.task_name,
            routed.task_key,
            routed.position,
            f"{routed.where} from its task manager's table refused the connection "
            f"({type(exc).__name__}); retry",
        )

    def _parse_output(self, inv: TaskInvocation, routed: Routed, raw: bytes) -> dict[str, Any]:
        descriptor = inv.task.descriptor
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise routed.failed(f"{routed.where} answered with invalid JSON: {_text(raw)}") from None
        try:
            output = descriptor.from_response(inv.task, inv, body)
            dumped: dict[str, Any] = output.model_dump(mode="json")
        except Exception as exc:
            raise routed.failed(
                f"its descriptor {type(descriptor).__name__} could not read the response of {routed.where}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return dumped


def _task_attributes(inv: TaskInvocation, position: int) -> Attributes:
    """What a task invocation's spans say about it (the class and deployment, never the input)."""
    return {
        "cornserve.task_class": type(inv.task).__name__,
        "cornserve.deployment_key": inv.task.deployment_key,
        "cornserve.position": position,
    }


def check_streams(invocations: Sequence[TaskInvocation], stream_subject: str | None) -> None:
    """Check the graph's streams before anything runs.

    At most one invocation streams (the graph's result), a streaming graph names a subject to relay
    it on, and every stream forward has exactly one consumer.
    """
    streaming = [i for i, inv in enumerate(invocations) if isinstance(inv.task_output, Stream)]
    if len(streaming) > 1:
        names = ", ".join(f"{invocations[i].task.display_name()} at position {i}" for i in streaming)
        raise faults.bad_request(f"{names} stream, but a graph relays at most one stream")
    if streaming and not stream_subject:
        position = streaming[0]
        raise faults.bad_request(
            f"{invocations[position].task.display_name()} at position {position} streams; "
            "the request must name a stream_subject to relay it on"
        )
    consumers: dict[str, list[int]] = {}
    for position, inv in enumerate(invocations):
        for fwd in iter_forwards(inv.task_input):
            if is_stream_forward(fwd) and position not in consumers.setdefault(fwd.id, []):
                consumers[fwd.id].append(position)
    for position, inv in enumerate(invocations):
        for fwd in iter_forwards(inv.task_output):
            count = len(consumers.get(fwd.id, [])) if is_stream_forward(fwd) else 1
            if count != 1:
                raise faults.bad_request(
                    f"stream forward {fwd.id} of {inv.task.display_name()} at position {position} has "
                    f"{count} consumers; a stream forward has exactly one"
                )


def tail_of(invocations: Sequence[TaskInvocation]) -> set[int]:
    """Positions a streaming graph's reply need not wait for (`Tail`).

    An invocation qualifies when its output is not the stream and holds nothing but forwards, one of
    them a stream forward: its output is known before it answers. Anything else (an encoder whose
    bad input must fail the reply with its 4xx, a value output) is waited for as before.
    """
    found: set[int] = set()
    for position, inv in enumerate(invocations):
        out = inv.task_output
        if isinstance(out, Stream):
            continue
        forwards = list(iter_forwards(out))
        if not any(is_stream_forward(f) for f in forwards):
            continue
        leaves = nested_values(out, opaque=(DataForward,))
        if any(isinstance(leaf, Unmaterialized) for leaf in leaves):
            continue
        found.add(position)
    return found


def _fault_of(errors: Sequence[BaseException]) -> ServiceFault:
    """The graph's error among concurrent failures: the first typed fault, else an internal error."""
    flat: list[BaseException] = []
    for error in errors:
        flat.extend(_flatten(error) if isinstance(error, BaseExceptionGroup) else [error])
    fault = next((e for e in flat if isinstance(e, ServiceFault)), None)
    if fault is not None:
        return fault
    logger.error("graph step failed unexpectedly", exc_info=flat[0])
    return ServiceFault(500, "internal", f"the dispatcher failed: {type(flat[0]).__name__}: {flat[0]}")


async def _first_fault(coros: Sequence[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently; the first failure cancels the rest and is raised alone.

    One coroutine is awaited inline: a task for it would only add loop turns to the graph's path.
    """
    if not coros:
        return
    if len(coros) == 1:
        try:
            await coros[0]
        except Exception as exc:
            raise _fault_of([exc]) from None
        return
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as failed:
        raise _fault_of(failed.exceptions) from None


def _flatten(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_flatten(exc))
        else:
            out.append(exc)
    return out


async def _status_failure(routed: Routed, response: aiohttp.ClientResponse) -> ServiceFault:
    """The executor's HTTP error answer as a fault carrying its own error text."""
    try:
        raw = await response.content.read(ERROR_READ_LIMIT)
    except aiohttp.ClientError:
        raw = b""
    return _status_fault(
        routed, response.status, raw, response.reason or "", response.headers.get("Retry-After")
    )


def _status_fault(
    routed: Routed, status: int, raw: bytes, reason: str, retry_after_header: str | None
) -> ServiceFault:
    """An executor's error answer (HTTP or channel: the same status and body) as a fault with its text."""
    text = _text(raw) or reason
    if status == 429:
        return faults.executor_overloaded(
            routed.task_name,
            routed.position,
            _error_message(raw) or text,
            retry_after(retry_after_header),
            executor_id=routed.route.executor_id,
        )
    if status in faults.CLIENT_ERROR_STATUSES:
        return faults.executor_rejected_input(
            routed.task_name,
            routed.position,
            status,
            _error_message(raw) or text,
            executor_id=routed.route.executor_id,
        )
    return routed.failed(
        f"{routed.where} answered HTTP {status}: {text}",
        status=status,
    )


def _reason(status: int) -> str:
    """The reason phrase HTTP would have sent with `status`."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def retry_after(header: str | None) -> float | None:
    """An executor's `Retry-After` in seconds (the delay-seconds form; anything else is ignored)."""
    try:
        seconds = float(header) if header is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 3600 else None


def _error_message(raw: bytes) -> str | None:
    """The message of an OpenAI-style `{"error": {"message": ...}}` body, if that is what it is."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return _text(error["message"].encode())
    if isinstance(error, str):
        return _text(error.encode())
    return None


def _text(raw: bytes) -> str:
    text = raw.decode(errors="replace").strip()
    if len(text) > ERROR_TEXT_LIMIT:
        text = text[:ERROR_TEXT_LIMIT] + " …(truncated)"
    return text
