"""Every NATS subject Cornserve's sidecar uses, defined in one place.

Subjects are lowercase, dot-separated, broad to narrow: ``cornserve.sidecar.<rank>.<verb>``.
Keeping the builders here means a server and all its clients can never disagree on a name.
"""

from __future__ import annotations

from enum import StrEnum

SIDECAR_SERVICE_NAME = "cornserve-sidecar"
"""The ``nats.micro`` service name every sidecar server registers under."""

SIDECAR_PREFIX = "cornserve.sidecar"

SIDECAR_UP_EVENT = f"{SIDECAR_PREFIX}.events.up"
"""Fan-out event a sidecar server publishes when it (re)starts; peers use it to detect restarts."""


class SidecarVerb(StrEnum):
    """Request/reply endpoints of one sidecar server."""

    # Client-facing (executor's client library -> its own sidecar server).
    INFO = "info"
    STATS = "stats"
    ALLOC = "alloc"
    FREE = "free"
    SEND = "send"
    RECV = "recv"
    DONE = "done"
    CLOSE = "close"
    # Peer-facing (sidecar server -> sidecar server).
    DELIVER = "deliver"
    RELEASE = "release"
    NOTICE = "notice"
    # Dispatcher-facing (a dispatcher -> every sidecar of an abandoned graph's forwards).
    DROP = "drop"


def sidecar_subject(rank: int, verb: SidecarVerb) -> str:
    """Subject of endpoint ``verb`` on the sidecar server of ``rank``."""
    if rank < 0:
        raise ValueError(f"sidecar rank must be >= 0, got {rank}")
    return f"{SIDECAR_PREFIX}.{rank}.{verb.value}"


def sidecar_released_subject(rank: int) -> str:
    """Events telling the clients of ``rank`` that an entry they own (e.g. a GPU tensor) was released."""
    return f"{SIDECAR_PREFIX}.{rank}.events.released"


def sidecar_nccl_pull_subject(rank: int) -> str:
    """Where the producer client of ``rank`` takes requests to NCCL-send a GPU chunk it holds."""
    return f"{SIDECAR_PREFIX}.{rank}.nccl.pull"
