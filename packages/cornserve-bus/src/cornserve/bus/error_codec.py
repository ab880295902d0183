"""The one codec of typed error replies on the bus, both directions.

A typed error reply is a micro error reply: the ``Nats-Service-Error`` (one-line message) and
``Nats-Service-Error-Code`` (HTTP-like status) headers, with an :class:`ErrorReply` JSON body that
carries the stable error kind and its details. Every service that answers with an error, whether
through ``nats.micro`` or on a plain subscription, encodes it here, and every client decodes it
here, so the headers, the body and the fallbacks for a foreign error reply cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from pydantic import ValidationError

from cornserve.bus.schemas import ErrorReply

UNPARSABLE_CODE = 502
"""The status a client assumes when an error reply's code header is not a number."""


@dataclass(frozen=True)
class DecodedError:
    """A typed error reply as a client received it."""

    code: str
    """The ``Nats-Service-Error-Code`` header, as sent (a decimal status from Cornserve services)."""
    reply: ErrorReply

    @property
    def status(self) -> int:
        """`code` as an integer status (:data:`UNPARSABLE_CODE` when a foreign service sent no number)."""
        try:
            return int(self.code)
        except ValueError:
            return UNPARSABLE_CODE


def encode_error(
    request_id: str, code: int, error: str, message: str, details: Mapping[str, Any] | None = None
) -> tuple[dict[str, str], bytes]:
    """Headers and body of one typed error reply."""
    body = ErrorReply(request_id=request_id, error=error, message=message, details=dict(details or {}))
    # Header values must be single-line; the body keeps the message as it is.
    headers = {ERROR_HEADER: message.replace("\r", " ").replace("\n", " "), ERROR_CODE_HEADER: str(code)}
    return headers, body.model_dump_json().encode()


async def respond_error(
    req: Request, request_id: str, code: int, error: str, message: str, **details: Any
) -> None:
    """Answer a ``nats.micro`` request with a typed error reply."""
    headers, body = encode_error(request_id, code, error, message, details)
    await req.respond(body, headers=headers)


async def publish_error(
    nc: Client, reply_subject: str, request_id: str, code: int, error: str, message: str, **details: Any
) -> None:
    """Answer a request received on a plain subscription (its reply subject) with a typed error reply."""
    headers, body = encode_error(request_id, code, error, message, details)
    await nc.publish(reply_subject, body, headers=headers)


def decode_error(headers: Mapping[str, str] | None, data: bytes) -> DecodedError | None:
    """The typed error a reply carries, or None for a successful reply.

    A body that is not an :class:`ErrorReply` (an error reply from a service that is not Cornserve's)
    still decodes: its kind is ``unknown`` and its message the ``Nats-Service-Error`` header.
    """
    if not headers or ERROR_CODE_HEADER not in headers:
        return None
    try:
        reply = ErrorReply.model_validate_json(data)
    except ValidationError:
        reply = ErrorReply(request_id="", error="unknown", message=headers.get(ERROR_HEADER, ""))
    return DecodedError(code=headers[ERROR_CODE_HEADER], reply=reply)


def request_id_of(data: bytes) -> str:
    """The request id of a message that failed validation, if it has one, so its error reply correlates."""
    try:
        obj = json.loads(data)
    except ValueError:
        return ""
    rid = obj.get("request_id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) else ""


def describe_invalid(exc: ValidationError) -> str:
    """A short, one-line account of why a request failed validation (its first five errors)."""
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
        for e in exc.errors(include_url=False)[:5]
    ]
    return "; ".join(parts)
