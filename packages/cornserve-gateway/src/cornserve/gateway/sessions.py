"""Client sessions: notebooks and SDK code that deploy tasks and invoke them through the gateway.

A session owns the tasks it deployed (owner `session:<id>` at the resource manager). Clients send
heartbeats; a session not heard from within its TTL is closed and its tasks released, so a
notebook that disconnects without saying goodbye does not hold devices forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.gateway.errors import HTTPError
from cornserve.task import UnitTask, deserialize_task, serialize_task

logger = logging.getLogger(__name__)

SESSION_PREFIX = "session:"


@dataclass
class Session:
    """One connected client."""

    id: str
    ttl_s: float
    task_keys: set[str] = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def owner(self) -> str:
        """The resource manager's owner id."""
        return SESSION_PREFIX + self.id

    def summary(self) -> dict[str, Any]:
        """The JSON shape returned by the API."""
        return {"session_id": self.id, "ttl_s": self.ttl_s, "tasks": sorted(self.task_keys)}


class SessionRegistry:
    """Creates sessions, deploys their tasks, and reaps idle ones."""

    def __init__(self, rm: ResourceManagerClient, default_ttl_s: float = 60.0) -> None:
        self._rm = rm
        self._sessions: dict[str, Session] = {}
        self.default_ttl_s = default_ttl_s
        self._reaper: asyncio.Task[None] | None = None

    def get(self, session_id: str) -> Session:
        """A live session (touching it), or 404."""
        session = self._sessions.get(session_id)
        if session is None:
            raise HTTPError(
                404,
                "session_not_found",
                f"no session {session_id!r} (closed, or expired after missing heartbeats)",
            )
        session.last_seen = time.monotonic()
        return session

    def create(self, ttl_s: float | None) -> Session:
        """A new, empty session."""
        session = Session(id=uuid.uuid4().hex, ttl_s=ttl_s or self.default_ttl_s)
        self._sessions[session.id] = session
        return session

    async def deploy(self, session: Session, task_specs: list[Any]) -> list[UnitTask[Any, Any]]:
        """Deploy unit tasks (serialized) for a session."""
        if not isinstance(task_specs, list) or not task_specs:
            raise HTTPError(
                400, "invalid_request", '"tasks" must be a non-empty list of {"name", "config"} objects'
            )
        tasks = [deserialize_task(spec) for spec in task_specs]
        await self._rm.deploy(session.owner, [serialize_task(t) for t in tasks])
        session.task_keys.update(t.deployment_key for t in tasks)
        session.last_seen = time.monotonic()
        return tasks

    async def close(self, session_id: str) -> dict[str, Any]:
        """Release a session's tasks and forget it."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise HTTPError(404, "session_not_found", f"no session {session_id!r}")
        reply = await self._rm.release(session.owner)
        return {"session_id": session_id, "released": reply.released, "torn_down": reply.torn_down}

    async def release_orphans(self) -> None:
        """After a gateway restart, release the tasks of sessions that died with the old gateway."""
        state = await self._rm.state()
        owners = {u for d in state.deployments for u in d.users if u.startswith(SESSION_PREFIX)}
        for owner in owners:
            if owner[len(SESSION_PREFIX) :] not in self._sessions:
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
                        "session %s missed its heartbeats for %.0f s; closing it", session.id, session.ttl_s
                    )
                    try:
                        await self.close(session.id)
                    except Exception:
                        logger.exception("closing expired session %s", session.id)

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
                logger.exception("closing session %s at shutdown", session_id)
