"""Typed request errors of the LLM executor, each with the HTTP status a client gets.

Every error a request can hit is one of these, so the server can answer an OpenAI-style
`{"error": {"message", "type"}}` body (or an SSE `data: {"error": ...}` line once streaming has
started) and keep serving other requests.
"""

from __future__ import annotations

from typing import Any


class ExecutorRequestError(Exception):
    """A request the executor cannot serve; `status` is the HTTP status to answer with."""

    status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body."""
        return {"error": {"message": self.message, "type": self.error_type, "code": self.status}}

    def headers(self) -> dict[str, str]:
        """Extra response headers (`Retry-After` on a 429)."""
        return {}


class InvalidRequest(ExecutorRequestError):
    """The request is malformed or inconsistent with how this executor is configured."""


class MediaInputError(ExecutorRequestError):
    """A media item of the request could not be fetched or decoded."""

    error_type = "invalid_media"


class MediaTooLarge(MediaInputError):
    """A media item is over a cap of the media policy (bytes, pixels, video frames/size/duration)."""

    status = 413


class ContextLengthExceeded(ExecutorRequestError):
    """Prompt plus requested completion tokens do not fit the model's context."""

    error_type = "context_length_exceeded"


class EmbeddingError(ExecutorRequestError):
    """An embedding forward arrived but does not fit the request (wrong modality, shape, model)."""

    error_type = "invalid_embedding"


class EmbeddingTimeout(ExecutorRequestError):
    """An embedding forward did not arrive through the sidecar before the deadline."""

    status = 504
    error_type = "embedding_timeout"


class ExecutorUnavailable(ExecutorRequestError):
    """The executor is shutting down or a dependency (the sidecar) is not reachable."""

    status = 503
    error_type = "unavailable"


class ExecutorOverloaded(ExecutorRequestError):
    """The engine's waiting queue is full (`--max-waiting`): retry after `Retry-After` seconds."""

    status = 429
    error_type = "overloaded"
    retry_after_s = 1

    def headers(self) -> dict[str, str]:
        """`Retry-After`, so callers back off instead of piling on."""
        return {"Retry-After": str(self.retry_after_s)}


class GenerationFailed(ExecutorRequestError):
    """The model failed while generating (a bug or resource problem, not the client's fault)."""

    status = 500
    error_type = "internal_error"
