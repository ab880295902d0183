"""Client sessions: notebooks and SDK code that deploy tasks and invoke them through the gateway.

A session id is a bearer capability: whoever knows it can deploy, invoke, heartbeat and close. So
it is unguessable (`secrets.token_urlsafe(32)`, 256 bits), it is only ever returned to the client
that created the session, and everything else — the resource manager's owner id (and so
`GET /tasks`), log lines, error messages — names the session by its fingerprint, a short hash that
cannot be turned back into the id. An unknown id (never existed, closed or expired) is 404.

A session owns the tasks it deployed (owner `session:<fingerprint>` at the resource manager).
Clients send heartbeats; a session not heard from within its TTL is closed and its tasks released,
so a notebook that disconnects without saying goodbye does not hold devices forever. TTLs are
bounded, each session may deploy a bounded number of tasks, and only so many sessions may be open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from cornserve.bus.gateway_api import SessionClosed, SessionInfo
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway.errors import HTTPError
from cornserve.task import UnitTask, deserialize_task, serialize_task
from cornserve.task.executor_flags import check_executor_flags

logger = logging.getLogger(__name__)

SESSION_PREFIX = "session:"

SESSION_ID_BYTES = 32
"""Random bytes in a session id (43 URL-safe characters)."""

FINGERPRINT_CHARS = 16
"""Hex digits of a session's fingerprint (64 bits of SHA-256: unique enough to tell sessions apart)."""

_SESSION_PATH = re.compile(r"^(/sessions/)([^/]+)")


def new_session_id() -> str:
    """An unguessable session id: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def fingerprint(session_id: str) -> str:
    """What names a session where its id must not appear (owner ids, logs, listings)."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:FINGERPRINT_CHARS]


def redact_path(path: str) -> str:
    """A request path fit for a log line: `/sessions/<id>/...` with the id replaced by its fingerprint."""
    return _SESSION_PATH.sub(lambda m: m.group(1) + "~" + fingerprint(m.group(2)), path)


@dataclass(frozen=True)
class SessionLimits:
    """Bounds on sessions (the gateway's `--session-*` settings, named in every refusal)."""

    default_ttl_s: float = 60.0
    max_ttl_s: float = 3600.0
    max_tasks: int = 16
    max_open: int = 64


@dataclass
class Session:
    """One connected client."""

    id: str
    ttl_s: float
    task_keys: set[str] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)
    deploying: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One deploy at a time, so two concurrent ones cannot both pass the quota check."""

    @property
    def fingerprint(self) -> str:
        """The session's name wherever its id must not appear."""
        return fingerprint(self.id)

    @property
    def owner(self) -> str:
        """The resource manager's owner id (listed by GET /tasks): the fingerprint, never the id."""
        return SESSION_PREFIX + self.fingerprint

    def summary(self) -> SessionInfo:
        """What the session's own client is answered."""
        return SessionInfo(
            session_id=self.id, owner=self.owner, ttl_s=self.ttl_s, tasks=sorted(self.task_keys)
        )


class SessionRegistry:
    """Creates sessions, deploys their tasks, and reaps idle ones."""

    def __init__(
        self,
        rm: ResourceManagerClient,
        limits: SessionLimits | None = None,
        allowed_flags: Collection[str] = (),
    ) -> None:
        self._rm = rm
        self._sessions: dict[str, Session] = {}
        self.limits = limits or SessionLimits()
        self.allowed_flags = frozenset(allowed_flags)
        self._reaper: asyncio.Task[None] | None = None

    def get(self, session_id: str) -> Session:
        """A live session (touching it), or 404 (never existed, closed, or expired: the same answer)."""
        session = self._sessions.get(session_id)
        if session is None:
            raise HTTPError(
                404, "session_not_found", "no such session (closed, or expired after missing heartbeats)"
            )
        session.last_seen = time.monotonic()
        return session

    def create(self, ttl_s: float | None) -> Session:
        """A new, empty session; 422 for a TTL beyond the limit, 503 when too many sessions are open."""
        limits = self.limits
        if ttl_s is not None and not (math.isfinite(ttl_s) and 0 < ttl_s <= limits.max_ttl_s):
            raise HTTPError(
                422,
                "validation_error",
                f'"ttl_s" must be a finite number of seconds in (0, {limits.max_ttl_s:g}] '
                f"(the gateway's --session-max-ttl), got {ttl_s!r}",
            )
        if len(self._sessions) >= limits.max_open:
            raise HTTPError(
                503,
                "too_many_sessions",
                f"{len(self._sessions)} sessions are open, the gateway's limit (--session-max-open); "
                "retry when one closes or expires",
                headers={"Retry-After": str(max(1, math.ceil(limits.default_ttl_s)))},
            )
        session = Session(id=new_session_id(), ttl_s=ttl_s or limits.default_ttl_s)
        self._sessions[session.id] = session
        logger.info("session ~%s opened (ttl %g s)", session.fingerprint, session.ttl_s)
        return session

    async def deploy(self, session: Session, task_specs: list[Any]) -> list[UnitTask[Any, Any]]:
        """Deploy unit tasks (serialized) for a session, within its quota and the executor-flag policy."""
        if not isinstance(task_specs, list) or not task_specs:
            raise HTTPError(
                400, "invalid_request", '"tasks" must be a non-empty list of {"name", "config"} objects'
            )
        tasks = [deserialize_task(spec) for spec in task_specs]
        for task in tasks:
            check_executor_flags(task, self.allowed_flags)
        async with session.deploying:
            keys = session.task_keys | {t.deployment_key for t in tasks}
            if len(keys) > self.limits.max_tasks:
                raise HTTPError(
                    403,
                    "session_quota_exceeded",
                    f"deploying these would give the session {len(keys)} unit tasks; a session may deploy "
                    f"{self.limits.max_tasks} (the gateway's --session-max-tasks)",
                )
            await self._rm.deploy(session.owner, [serialize_task(t) for t in tasks])
            session.task_keys.update(keys)
            session.last_seen = time.monotonic()
        return tasks

    async def close(self, session_id: str) -> SessionClosed:
        """Release a session's tasks and forget it."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise HTTPError(404, "session_not_found", "no such session (closed, or expired)")
        reply = await self._rm.release(session.owner)
        logger.info("session ~%s closed", session.fingerprint)
        return SessionClosed(session_id=session_id, released=reply.released, torn_down=reply.torn_down)

    async def release_orphans(self) -> None:
        """After a gateway restart, release the tasks of sessions that died with the old gateway."""
        state = await self._rm.state()
        owners = {u for d in state.deployments for u in d.users if u.startswith(SESSION_PREFIX)}
        live = {s.owner for s in self._sessions.values()}
        for owner in owners - live:
            logger.info("releasing tasks of orphaned %s", owner)
            await self._rm.release(owner)

    def start(self, interval_s: float = 5.0) -> None:
        """Start reaping sessions idle for longer than their TTL."""
        self._reaper = asyncio.create_task(self._reap(interval_s))

    async def _reap(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if now - session.last_seen > session.ttl_s:
                    logger.info(
                        "session ~%s missed its heartbeats for %.0f s; closing it",
                        session.fingerprint,
                        session.ttl_s,
                    )
                    try:
                        await self.close(session.id)
                    except Exception:
                        logger.exception("closing expired session ~%s", session.fingerprint)

    async def stop(self) -> None:
        """Stop reaping and release every session's tasks."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for session_id in list(self._sessions):
            try:
                await self.close(session_id)
            except Exception:
                logger.exception("closing session ~%s at shutdown", fingerprint(session_id))
