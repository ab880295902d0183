"""The one way a Cornserve process connects to NATS, with one reconnect policy for all of them.

A running process rides out NATS restarts (unlimited reconnects every `RECONNECT_WAIT_S`), while the
*first* connect has a deadline (nats-py would otherwise retry it forever too) and fails with a
`NatsConnectTimeout` that names the URL. Disconnects, reconnects and errors are logged, each state
change once, so an operator sees an outage start and end in every service's log.

Credentials (`creds`, a file path) are how a process proves which role it plays on an authenticated
NATS (see `cornserve.runtime.natscreds`); a server that refuses them fails the first connect at once
with a `NatsAuthError` naming the URL and the file, instead of a retry loop ending in a timeout.

A NATS cluster is given as its whole server list, comma-separated in one string (``--nats-url``,
``CORNSERVE_NATS_URL``: "nats://a:4222,nats://b:4222") so every process hands it down unchanged, and
`nats_servers` turns it into the list nats-py wants: the client then connects to any live server and
moves to another one when its server dies.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import AuthorizationError

from cornserve.runtime.natscreds import connect_options

logger = logging.getLogger(__name__)

RECONNECT_WAIT_S = 0.5
"""Seconds between reconnect attempts (NATS on loopback or in the cluster comes back quickly)."""
MAX_RECONNECT_ATTEMPTS = -1
"""Unlimited: a service never gives up on NATS while it runs; its supervisor decides when to stop it."""
CONNECT_TIMEOUT_S = 2.0
"""Seconds one TCP connect + handshake attempt may take."""
FIRST_CONNECT_DEADLINE_S = 10.0
"""Seconds a process waits for NATS at start-up before it gives up."""
PING_INTERVAL_S = 20
"""Seconds between client pings; with `MAX_OUTSTANDING_PINGS` a dead server is noticed within a minute."""
MAX_OUTSTANDING_PINGS = 3


_POLICY: dict[str, Any] = {
    "reconnect_time_wait": RECONNECT_WAIT_S,
    "max_reconnect_attempts": MAX_RECONNECT_ATTEMPTS,
    "ping_interval": PING_INTERVAL_S,
    "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
}


def nats_servers(servers: str | list[str]) -> list[str]:
    """The server URLs of `servers`: a comma-separated string (blanks dropped) or a list.

    Raises ValueError when none is left, so a mistyped setting fails at start-up with the text given.
    """
    parts = servers.split(",") if isinstance(servers, str) else servers
    found = [part.strip() for part in parts if part.strip()]
    if not found:
        raise ValueError(f"no NATS server URL in {servers!r}")
    return found


class NatsConnectTimeout(TimeoutError):
    """NATS did not accept the first connection in time (is it running, is the URL right?)."""


class NatsAuthError(PermissionError):
    """NATS refused this process's credentials (none given, a wrong file, or a stale one)."""


async def connect_nats(
    servers: str | list[str],
    *,
    name: str,
    creds: str | Path | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    first_connect_deadline_s: float = FIRST_CONNECT_DEADLINE_S,
) -> Client:
    """Connect as client `name` (shown by ``nats server report connections``) with the shared policy.

    `creds` is a credentials file (`cornserve.runtime.natscreds` reads it; a bad one raises
    `NatsCredentialsError` before any connect); `servers` is one URL or several (see `nats_servers`).
    Raises `NatsAuthError` when the server refuses them
    and `NatsConnectTimeout` when it cannot be reached within `first_connect_deadline_s`.
    """
    server_list = nats_servers(servers)
    options = connect_options(Path(creds)) if creds is not None else {}
    log = _ConnectionLog(name)
    refused: asyncio.Future[Client] = asyncio.get_running_loop().create_future()

    def on_auth_error(exc: Exception) -> None:
        if not refused.done():
            refused.set_exception(exc)

    log.on_auth_error = on_auth_error
    connecting: asyncio.Future[Client] = asyncio.ensure_future(
        nats.connect(
            server_list, name=name, connect_timeout=connect_timeout_s, **_POLICY, **options, **log.callbacks()
        )
    )
    try:
        done, _ = await asyncio.wait(
            {connecting, refused}, timeout=first_connect_deadline_s, return_when=asyncio.FIRST_COMPLETED
        )
        if connecting in done:
            log.client = connecting.result()
            return log.client
        if refused in done:
            which = f"credentials file {creds}" if creds is not None else "no credentials"
            fix = "" if creds is not None else " (set --nats-creds or CORNSERVE_NATS_CREDS)"
            raise NatsAuthError(
                f"{name}: NATS at {','.join(server_list)} refused the connection with {which}: {refused.exception()}{fix}"
            )
        raise NatsConnectTimeout(
            f"{name}: cannot reach NATS at {','.join(server_list)} within {first_connect_deadline_s:g} s "
            "(is nats-server running? set --nats-url or CORNSERVE_NATS_URL)"
        )
    finally:
        log.on_auth_error = None
        if refused.done():
            refused.exception()  # retrieved (also when the connect won a race with a refusal)
        else:
            refused.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.wait({connecting})  # its CancelledError stays in the task; ours is not eaten


def _is_auth_error(exc: Exception) -> bool:
    """Whether the server refused the login (nats-py reports it as a typed or a plain error)."""
    return isinstance(exc, AuthorizationError) or "authorization violation" in str(exc).lower()


class _ConnectionLog:
    """nats-py callbacks that log each connection state change (repeated identical errors once)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last_error = ""
        self.on_auth_error: Any = None
        """Called with an `AuthorizationError` while the first connect is under way."""
        self.client: Client | None = None
        """The connection, once connected (its own `close` also reports a disconnect)."""

    def callbacks(self) -> dict[str, Any]:
        """The nats-py callback keyword arguments."""
        return {
            "error_cb": self.on_error,
            "disconnected_cb": self.on_disconnected,
            "reconnected_cb": self.on_reconnected,
            "closed_cb": self.on_closed,
        }

    async def on_error(self, exc: Exception) -> None:
        if self.on_auth_error is not None and _is_auth_error(exc):
            self.on_auth_error(exc)
        text = f"{type(exc).__name__}: {exc}"
        if text != self._last_error:
            self._last_error = text
            logger.warning("%s: NATS error: %s", self.name, text)

    async def on_disconnected(self) -> None:
        if self.client is not None and self.client.is_closed:
            return  # our own close: nats-py reports it as a disconnect too, and nothing reconnects
        logger.warning("%s: disconnected from NATS; reconnecting every %g s", self.name, RECONNECT_WAIT_S)

    async def on_reconnected(self) -> None:
        self._last_error = ""
        logger.info("%s: reconnected to NATS", self.name)

    async def on_closed(self) -> None:
        logger.debug("%s: NATS connection closed", self.name)
