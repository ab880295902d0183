"""Thin helpers over ``nats.micro`` so every Cornserve service speaks the same request/reply dialect.

Requests and replies are pydantic models serialized as JSON. Errors come back as micro error replies
(``Nats-Service-Error`` / ``Nats-Service-Error-Code`` headers) with an :class:`ErrorReply` body, and
the calling side turns "nobody is listening" and "nobody answered in time" into distinct exceptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from pydantic import BaseModel, ValidationError

from cornserve.bus.schemas import ErrorReply
from cornserve.runtime.logging import set_request_id

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
        msg = await nc.request(subject, payload.model_dump_json().encode(), timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise NoResponders(subject) from exc
    except nats.errors.TimeoutError as exc:
        raise RequestTimeout(subject, timeout) from exc
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        code = headers[ERROR_CODE_HEADER]
        try:
            error = ErrorReply.model_validate_json(msg.data)
        except ValidationError:
            error = ErrorReply(request_id="", error="unknown", message=headers.get(ERROR_HEADER, ""))
        raise ServiceErrorReply(subject, code, error)
    return reply_type.model_validate_json(msg.data)


async def respond_error(
    req: Request, request_id: str, code: int, error: str, message: str, **details: Any
) -> None:
    """Send a typed error reply: micro error headers plus an :class:`ErrorReply` JSON body."""
    body = ErrorReply(request_id=request_id, error=error, message=message, details=details)
    # Header values must be single-line.
    await req.respond_error(
        str(code), message.replace("\r", " ").replace("\n", " "), data=body.model_dump_json().encode()
    )


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
    ) -> Callable[[Request], Awaitable[None]]:
        """Build a micro handler that parses ``request_type``, runs ``fn`` in a task and replies."""

        async def handler(req: Request) -> None:
            try:
                parsed = request_type.model_validate_json(req.data)
            except ValidationError as exc:
                await respond_error(req, _best_effort_request_id(req.data), 400, "bad_request", _short(exc))
                return
            task = asyncio.create_task(self._run(req, parsed, fn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return handler

    async def _run(self, req: Request, parsed: ReqT, fn: Callable[[ReqT], Awaitable[BaseModel]]) -> None:
        request_id = str(getattr(parsed, "request_id", ""))
        set_request_id(request_id)  # this task serves one request: its log lines carry the id
        try:
            reply = await fn(parsed)
        except ServiceFault as fault:
            await respond_error(req, request_id, fault.code, fault.error, fault.message, **fault.details)
            return
        except Exception as exc:
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


def _best_effort_request_id(data: bytes) -> str:
    """Pull a request id out of a malformed message so even a bad request gets a correlatable reply."""
    import json

    try:
        obj = json.loads(data)
    except ValueError:
        return ""
    if isinstance(obj, dict) and isinstance(obj.get("request_id"), str):
        return str(obj["request_id"])
    return ""


def _short(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]]
    return "invalid request: " + "; ".join(parts)
