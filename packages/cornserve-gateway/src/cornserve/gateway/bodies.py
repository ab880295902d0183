"""Request and response bodies on the wire: strict JSON in, `cornserve.bus.gateway_api` models both ways."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from cornserve.gateway.errors import HTTPError

Body = TypeVar("Body", bound=BaseModel)

MAX_BODY = 64 * 1024 * 1024
"""The default body cap; the running gateway uses the NATS `max_payload` instead (see `Gateway.app`)."""
MAX_BODY_KEY = web.AppKey("max_body", int)
"""Where the application keeps its body cap (for the 413 message)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def strict_json_loads(text: str) -> Any:
    """`json.loads` without Python's extensions: the literals NaN, Infinity and -Infinity are refused."""
    return json.loads(text, parse_constant=_no_constant)


async def read_json(request: web.Request) -> Any:
    """The request body as (standard) JSON, or 400."""
    try:
        return await request.json(loads=strict_json_loads)
    except web.HTTPRequestEntityTooLarge as exc:
        raise HTTPError(
            413,
            "payload_too_large",
            f"the request body is larger than {request.app[MAX_BODY_KEY]} bytes, the most the gateway "
            "accepts (the message bus's payload limit, which every request and graph must fit in); "
            "pass large media as file: or http(s): URLs instead of data: URLs, or send smaller inputs",
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise HTTPError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc


def require_object(body: Any, what: str) -> dict[str, Any]:
    """The body as a JSON object, or 400 naming what it should be."""
    if not isinstance(body, dict):
        raise HTTPError(400, "invalid_request", f"the request body must be a JSON object: {what}")
    return body


async def read_body(request: web.Request, model: type[Body]) -> Body:
    """The request body validated by its `cornserve.bus.gateway_api` model.

    Not JSON, or not an object: 400; fields missing, unknown or of the wrong type: 422 with
    pydantic's error list (through `errors.to_http_error`).
    """
    fields = ", ".join(f'"{name}"' for name in model.model_fields)
    return model.model_validate(require_object(await read_json(request), f"{model.__name__} ({fields})"))


def reply(value: BaseModel | Sequence[BaseModel], status: int = 200) -> web.Response:
    """A JSON response from a response model (or a list of them): the typed answer of every route."""
    if isinstance(value, BaseModel):
        text = value.model_dump_json()
    else:
        text = "[" + ",".join(item.model_dump_json() for item in value) + "]"
    return web.Response(text=text, status=status, content_type="application/json")
