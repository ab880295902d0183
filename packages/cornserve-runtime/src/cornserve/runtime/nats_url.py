"""The NATS URL a process uses when none is given on its command line."""

from __future__ import annotations

import os

NATS_URL_ENV = "CORNSERVE_NATS_URL"
"""Set by `cornserve up` (and the task manager for its executors) for every child."""


def nats_url_from_env(default: str = "nats://127.0.0.1:4222") -> str:
    """``$CORNSERVE_NATS_URL``, else `default` (a NATS server on this machine's standard port)."""
    return os.environ.get(NATS_URL_ENV, default)
