"""Every exception the sidecar client raises, in one place.

Each error kind has a stable string code (``error`` in the wire's ErrorReply) so a server-side
failure is re-raised on the client as the same class.
"""

from __future__ import annotations

from typing import Any

ERRORS_BY_KIND: dict[str, type[SidecarError]] = {}
"""Every error class by its wire kind; filled as the classes below are defined."""


class SidecarError(Exception):
    """Base class of sidecar failures; each subclass names its wire error kind (``kind=...``)."""

    kind = "sidecar_error"

    def __init_subclass__(cls, *, kind: str, **rest: Any) -> None:
        super().__init_subclass__(**rest)
        if kind in ERRORS_BY_KIND:
            raise TypeError(f"sidecar error kind {kind!r} is already {ERRORS_BY_KIND[kind].__name__}")
        cls.kind = kind
        ERRORS_BY_KIND[kind] = cls

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.details = details


class BadRequest(SidecarError, kind="bad_request"):
    """A message on a sidecar subject was malformed or inconsistent."""


class UnsupportedData(SidecarError, TypeError, kind="unsupported_data"):
    """The value cannot be sent (type not supported)."""


class GpuUnavailable(UnsupportedData, kind="gpu_unavailable"):
    """A CUDA tensor cannot take the GPU path here.

    No CuPy (or one older than 14), no CUDA device, or a PyTorch allocator whose memory cannot be
    exported as a CUDA IPC handle; the message says which.
    """


class GpuTransferFailed(SidecarError, kind="gpu_transfer"):
    """An NCCL operation failed, or the producer has no communicator for this consumer.

    The communicator was aborted and discarded, so the next transfer builds a fresh one.
    """


class SidecarUnavailable(SidecarError, kind="unavailable"):
    """The client's own sidecar server is not running (no responders on its subjects)."""


class DestinationUnreachable(SidecarError, kind="unreachable"):
    """A destination sidecar rank does not answer; ``details['rank']`` names it."""


class RecvTimeout(SidecarError, TimeoutError, kind="recv_timeout"):
    """Nothing arrived for the id/chunk before the deadline; ``details['id']`` names it."""


class PeerAuthFailed(SidecarError, kind="peer_auth"):
    """A cross-node transfer was refused: the two sidecars do not share the cluster's peer secret.

    Either side may have none configured (``--peer-secret-file``) or a different one.
    """


class SidecarTimeout(SidecarError, TimeoutError, kind="timeout"):
    """A control request got no answer before its deadline."""


class MemoryPressure(SidecarError, kind="memory_pressure"):
    """The arena had no room for the data before the deadline."""


class TooLarge(SidecarError, kind="too_large"):
    """The data can never fit: it is larger than the arena."""


class DataLost(SidecarError, kind="data_lost"):
    """The data was sent but the sidecar holding it restarted; it will never arrive."""


class DataExpired(SidecarError, kind="data_expired"):
    """Nobody claimed the data within the TTL; it was freed."""


class DataDropped(SidecarError, kind="data_dropped"):
    """The data's graph was given up (cancelled or failed) and its dispatcher had it freed."""


class AlreadyConsumed(SidecarError, kind="already_consumed"):
    """``recv`` after ``mark_done`` of the same chunk."""


class UnknownStream(SidecarError, kind="unknown_stream"):
    """``close_stream`` for an id this sidecar never sent and without destinations."""


class NotFound(SidecarError, kind="not_found"):
    """Referenced allocation or entry does not exist on the server."""


class InternalError(SidecarError, kind="internal"):
    """The server failed unexpectedly (it logged the traceback)."""


def error_from_kind(kind: str, message: str, details: dict[str, Any]) -> SidecarError:
    """Rebuild the client-side exception for a server error reply."""
    return ERRORS_BY_KIND.get(kind, SidecarError)(message, **details)
