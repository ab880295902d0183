"""Thin helpers over ``nats.micro`` so every Cornserve service speaks the same request/reply dialect.

Requests and replies are pydantic models serialized as JSON. Errors come back as typed error replies
(encoded and decoded by :mod:`cornserve.bus.error_codec`), and the calling side turns "nobody is
listening" and "nobody answered in time" into distinct exceptions.

Trace context rides along: `request` sends the current span's ``traceparent`` as a NATS header, and a
handler whose request carries one runs inside a server span that is its child
(`cornserve.runtime.tracing`). Requests without it (health polls, status) start no span.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.micro.request import Request
from pydantic import BaseModel, ValidationError

from cornserve.bus.error_codec import decode_error, describe_invalid, request_id_of, respond_error
from cornserve.bus.schemas import ErrorReply
from cornserve.runtime.logging import set_request_id
from cornserve.runtime.tracing import SpanKind, extract_context, inject_headers, mark_error, span

logger = logging.getLogger(__name__)

ReqT = TypeVar("ReqT", bound=BaseModel)
RepT = TypeVar("RepT", bound=BaseModel)


class BusError(Exception):
    """Base class of every failure of a request over the bus."""

    def __init__(self, subject: str, message: str) -> None:
        super().__init__(message)
        self.subject = subject


class NoResponders(BusError):
    """No service is subscribed to the subject: it is down or was never started."""

    def __init__(self, subject: str) -> None:
        super().__init__(subject, f"no responders on {subject!r}")


class RequestTimeout(BusError):
    """A service is subscribed but did not answer before the deadline."""

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(subject, f"no reply on {subject!r} within {timeout:.3f}s")
        self.timeout = timeout


class ServiceErrorReply(BusError):
    """The service answered with a typed error reply."""

    def __init__(self, subject: str, code: str, error: ErrorReply) -> None:
        super().__init__(subject, f"{error.error} ({code}): {error.message}")
        self.code = code
        self.error = error


class ServiceFault(Exception):
    """Raised inside a handler to send a typed error reply instead of a result.

    ``code`` is the HTTP-like status carried in ``Nats-Service-Error-Code``; ``error`` is a stable,
    machine-readable error kind the client maps back to an exception class.
    """

    def __init__(self, code: int, error: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.error = error
        self.message = message
        self.details = details


async def request(
    nc: Client,
    subject: str,
    payload: BaseModel,
    reply_type: type[RepT],
    timeout: float,
) -> RepT:
    """Send ``payload`` to ``subject`` and parse the reply as ``reply_type``.

    Raises :class:`NoResponders`, :class:`RequestTimeout` or :class:`ServiceErrorReply`.
    """
    try:
        msg = await nc.request(
            subject, payload.model_dump_json().encode(), timeout=timeout, headers=inject_headers() or None
        )
    except nats.errors.NoRespondersError as exc:
        raise NoResponders(subject) from exc
    except nats.errors.TimeoutError as exc:
        raise RequestTimeout(subject, timeout) from exc
    error = decode_error(msg.headers, msg.data)
    if error is not None:
        raise ServiceErrorReply(subject, error.code, error.reply)
    return reply_type.model_validate_json(msg.data)


async def respond_fault(req: Request, request_id: str, fault: ServiceFault) -> None:
    """Answer `req` with the typed error reply `fault` describes."""
    await respond_error(req, request_id, fault.code, fault.error, fault.message, **fault.details)


class HandlerRunner:
    """Adapts ``async (request_model) -> reply_model`` functions into ``nats.micro`` handlers.

    Micro runs one subscription's callbacks one at a time, so a handler that waits (for data, for
    memory) would stall every other request on that endpoint. Handlers are therefore run as tasks;
    the runner keeps references to them and cancels them on :meth:`close`.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def wrap(
        self,
        request_type: type[ReqT],
        fn: Callable[[ReqT], Awaitable[BaseModel]],
        span_name: str | None = None,
    ) -> Callable[[Request], Awaitable[None]]:
        """Build a micro handler that parses ``request_type``, runs ``fn`` in a task and replies.

        `span_name` names the server span of a traced request (default: the request type's name).
        """
        name = span_name or request_type.__name__

        async def handler(req: Request) -> None:
            try:
                parsed = request_type.model_validate_json(req.data)
            except ValidationError as exc:
                message = "invalid request: " + describe_invalid(exc)
                await respond_error(req, request_id_of(req.data), 400, "bad_request", message)
                return
            task = asyncio.create_task(self._run(req, parsed, fn, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return handler

    async def _run(
        self, req: Request, parsed: ReqT, fn: Callable[[ReqT], Awaitable[BaseModel]], span_name: str
    ) -> None:
        request_id = str(getattr(parsed, "request_id", ""))
        set_request_id(request_id)  # this task serves one request: its log lines carry the id
        parent = extract_context(req.headers)
        if parent is None:
            await self._answer(req, parsed, fn, request_id)
            return
        attributes = {"messaging.system": "nats", "messaging.destination.name": req.subject}
        with span(span_name, kind=SpanKind.SERVER, parent=parent, attributes=attributes):
            await self._answer(req, parsed, fn, request_id)

    async def _answer(
        self, req: Request, parsed: ReqT, fn: Callable[[ReqT], Awaitable[BaseModel]], request_id: str
    ) -> None:
        try:
            reply = await fn(parsed)
        except ServiceFault as fault:
            mark_error(f"{fault.error}: {fault.message}")
            await respond_fault(req, request_id, fault)
            return
        except Exception as exc:
            mark_error(f"{type(exc).__name__}: {exc}")
            logger.exception("handler for %s failed", req.subject)
            await respond_error(req, request_id, 500, "internal", f"{type(exc).__name__}: {exc}")
            return
        await req.respond(reply.model_dump_json().encode())

    async def close(self) -> None:
        """Cancel handlers still running (e.g. long-polling receives) and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
