"""Errors as HTTP responses: every failure maps to a status code and a JSON body a user can act on."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from cornserve.app import AppValidationError
from cornserve.bus.gateway_api import ErrorBody, OpenAIErrorBody, OpenAIErrorDetail
from cornserve.bus.micro import BusError, NoResponders, RequestTimeout, ServiceErrorReply
from cornserve.task.errors import (
    ExecutorFlagError,
    InvalidTaskInputError,
    NoGraphRunnerError,
    StaticGraphError,
    TaskDefinitionError,
    TaskError,
    TaskExecutionError,
    TaskRegistryError,
    TaskSerializationError,
)


class HTTPError(Exception):
    """Raised by handlers to answer with `status` and a JSON error body."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """`{"error": kind, "message": text, "detail": ...}` (`ErrorBody`; no `detail` when there is none)."""
        model = ErrorBody(error=self.error, message=self.message, detail=self.detail)
        return model.model_dump(mode="json", exclude_none=True)

    def response(self) -> web.Response:
        """The error as an aiohttp response."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def openai_status(self) -> int:
        """The status on an OpenAI route: 400 where Cornserve answers 422 (OpenAI never answers 422)."""
        return 400 if self.status == 422 else self.status

    def openai_body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, the shape OpenAI's clients parse."""
        detail = OpenAIErrorDetail(
            message=self.message,
            type=_OPENAI_TYPES.get(
                self.status, "server_error" if self.status >= 500 else "invalid_request_error"
            ),
            param=_param_of(self.detail),
            code=self.error,
        )
        return OpenAIErrorBody(error=detail).model_dump(mode="json")

    def response_for(self, request: web.Request) -> web.Response:
        """The error in the shape the route speaks: OpenAI's under `/v1/`, Cornserve's elsewhere."""
        if not is_openai_path(request.path):
            return self.response()
        return web.json_response(self.openai_body(), status=self.openai_status(), headers=self.headers)


OPENAI_PREFIX = "/v1/"
"""The OpenAI-compatible routes (`cornserve.gateway.openai_compat`); their errors are OpenAI-shaped."""


def is_openai_path(path: str) -> bool:
    """Whether `path` is under the OpenAI-compatible prefix (a 404 there is OpenAI-shaped too)."""
    return path.startswith(OPENAI_PREFIX)


_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
"""OpenAI's error `type` by status (other 4xx: `invalid_request_error`, 5xx: `server_error`)."""


def _param_of(detail: Any) -> str | None:
    """The request field a validation error is about (pydantic's first `loc`), as OpenAI's `param`."""
    if isinstance(detail, dict) and isinstance(detail.get("param"), str):
        return str(detail["param"])
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = detail[0].get("loc")
        if isinstance(loc, list | tuple) and loc:
            return ".".join(str(part) for part in loc)
    return None


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's error list in a JSON-safe form (loc, msg, type, input)."""
    detail: list[dict[str, Any]] = json.loads(exc.json(include_url=False))
    return detail


def _code_status(code: str, default: int) -> int:
    try:
        status = int(code)
    except ValueError:
        return default
    return status if 400 <= status <= 599 else default


def _retry_after(exc: BaseException, status: int) -> dict[str, str] | None:
    """`Retry-After` for a 429 (an executor's or dispatcher's queue was full): theirs, else 1 s."""
    if status != 429:
        return None
    seconds = getattr(exc, "retry_after_s", None)
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        seconds = 1
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def to_http_error(exc: BaseException) -> HTTPError:
    """Map any exception from validation, the bus or task execution to an HTTP error."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, AppValidationError):
        return HTTPError(400, "invalid_app", str(exc))
    if isinstance(exc, ValidationError):
        return HTTPError(
            422, "validation_error", f"{exc.error_count()} validation error(s)", validation_detail(exc)
        )
    if isinstance(exc, ExecutorFlagError):
        return HTTPError(403, "executor_flag_refused", str(exc), {"flag": exc.flag})
    if isinstance(exc, InvalidTaskInputError):
        return HTTPError(422, "invalid_task_input", str(exc))
    if isinstance(exc, TaskExecutionError):
        code = getattr(exc, "code", None)
        status = _code_status(str(code), 502) if code is not None else 502
        kind = getattr(exc, "error", None) or {
            404: "task_not_deployed",
            429: "overloaded",
            503: "unavailable",
            504: "timeout",
        }.get(status, "executor_failed")
        return HTTPError(status, str(kind), str(exc), headers=_retry_after(exc, status))
    if isinstance(exc, ServiceErrorReply):
        return HTTPError(_code_status(exc.code, 502), exc.error.error, exc.error.message)
    if isinstance(exc, NoResponders):
        return HTTPError(503, "service_unavailable", f"{exc} — is the service running?")
    if isinstance(exc, RequestTimeout):
        return HTTPError(504, "timeout", str(exc))
    if isinstance(exc, BusError):
        return HTTPError(502, "bus_error", str(exc))
    if isinstance(exc, (StaticGraphError, TaskDefinitionError, NoGraphRunnerError)):
        return HTTPError(500, "app_error", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (TaskRegistryError, TaskSerializationError)):
        return HTTPError(400, "invalid_task", str(exc))
    if isinstance(exc, TaskError):
        return HTTPError(500, "task_error", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError):
        return HTTPError(504, "timeout", "the request did not finish before its deadline")
    return HTTPError(500, "internal", f"{type(exc).__name__}: {exc}")
