"""Every exception the sidecar client raises, in one place.

Each error kind has a stable string code (``error`` in the wire's ErrorReply) so a server-side
failure is re-raised on the client as the same class.
"""

from __future__ import annotations

from typing import Any


class SidecarError(Exception):
    """Base class of sidecar failures."""

    kind = "sidecar_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


class BadRequest(SidecarError):
    """A message on a sidecar subject was malformed or inconsistent."""

    kind = "bad_request"


class UnsupportedData(SidecarError, TypeError):
    """The value cannot be sent (type not supported)."""

    kind = "unsupported_data"


class SidecarUnavailable(SidecarError):
    """The client's own sidecar server is not running (no responders on its subjects)."""

    kind = "unavailable"


class DestinationUnreachable(SidecarError):
    """A destination sidecar rank does not answer; ``details['rank']`` names it."""

    kind = "unreachable"


class RecvTimeout(SidecarError, TimeoutError):
    """Nothing arrived for the id/chunk before the deadline; ``details['id']`` names it."""

    kind = "recv_timeout"


class SidecarTimeout(SidecarError, TimeoutError):
    """A control request got no answer before its deadline."""

    kind = "timeout"


class MemoryPressure(SidecarError):
    """The arena had no room for the data before the deadline."""

    kind = "memory_pressure"


class TooLarge(SidecarError):
    """The data can never fit: it is larger than the arena."""

    kind = "too_large"


class DataLost(SidecarError):
    """The data was sent but the sidecar holding it restarted; it will never arrive."""

    kind = "data_lost"


class DataExpired(SidecarError):
    """Nobody claimed the data within the TTL; it was freed."""

    kind = "data_expired"


class AlreadyConsumed(SidecarError):
    """``recv`` after ``mark_done`` of the same chunk."""

    kind = "already_consumed"


class UnknownStream(SidecarError):
    """``close_stream`` for an id this sidecar never sent and without destinations."""

    kind = "unknown_stream"


class NotFound(SidecarError):
    """Referenced allocation or entry does not exist on the server."""

    kind = "not_found"


class InternalError(SidecarError):
    """The server failed unexpectedly (it logged the traceback)."""

    kind = "internal"


ERRORS_BY_KIND: dict[str, type[SidecarError]] = {
    cls.kind: cls
    for cls in (
        BadRequest,
        UnsupportedData,
        SidecarUnavailable,
        DestinationUnreachable,
        RecvTimeout,
        SidecarTimeout,
        MemoryPressure,
        TooLarge,
        DataLost,
        DataExpired,
        AlreadyConsumed,
        UnknownStream,
        NotFound,
        InternalError,
    )
}


def error_from_kind(kind: str, message: str, details: dict[str, Any]) -> SidecarError:
    """Rebuild the client-side exception for a server error reply."""
    return ERRORS_BY_KIND.get(kind, SidecarError)(message, **details)
