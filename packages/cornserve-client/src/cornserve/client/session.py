"""Notebook/SDK sessions: deploy tasks on a running cluster and `await task(input)` against it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from cornserve.bus.gateway_api import (
    SessionCreate,
    SessionDeploy,
    SessionDeployed,
    SessionInfo,
    SessionInvoke,
    SessionOutputs,
    SessionStreamLine,
)
from cornserve.client.errors import CornserveError
from cornserve.client.http import CornserveClient
from cornserve.task import (
    Stream,
    Task,
    TaskExecutionError,
    TaskInvocation,
    TaskOutput,
    discover_unit_tasks,
    serialize_task,
    set_graph_runner,
)

logger = logging.getLogger(__name__)

_INVOCATIONS = TypeAdapter(list[TaskInvocation])


class ClusterSession:
    """A session on the gateway: owns the tasks it deployed and executes graphs for `await task(...)`.

    It is a `cornserve.task.GraphRunner`; `connect()` installs it as the process's graph runner.
    """

    def __init__(self, client: CornserveClient, session_id: str, ttl_s: float, owner: str = "") -> None:
        self.client = client
        self.session_id = session_id
        """The session's capability: keep it out of logs (`owner` names the session there)."""
        self.ttl_s = ttl_s
        self.owner = owner or "session"
        self._heartbeat: asyncio.Task[None] | None = None
        self.closed = False

    def _redact(self, text: str) -> str:
        """`text` (an error message, which may hold a request path) without the session id."""
        return text.replace(self.session_id, self.owner)

    async def deploy(self, *tasks: Task[Any, Any]) -> list[str]:
        """Deploy every unit task reachable from `tasks`; returns their deployment keys."""
        units = discover_unit_tasks(tasks)
        body = SessionDeploy(tasks=[serialize_task(t) for t in units]).model_dump()
        reply = await self.client.call("POST", f"/sessions/{self.session_id}/tasks", body)
        return SessionDeployed.model_validate(reply).deployed

    async def run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        """Send a recorded graph to the gateway; rebuild the outputs (and the stream, if any)."""
        body = SessionInvoke(
            invocations=_INVOCATIONS.dump_python(list(invocations), mode="json")
        ).model_dump()
        lines = self.client.stream("POST", f"/sessions/{self.session_id}/invoke", body)
        try:
            first = await anext(lines)
        except CornserveError as exc:
            raise TaskExecutionError(self._redact(exc.message)) from exc
        except StopAsyncIteration:
            raise TaskExecutionError("the gateway returned an empty response") from None
        raw_outputs = SessionOutputs.model_validate(first).outputs
        outputs: list[TaskOutput] = []
        for inv, raw in zip(invocations, raw_outputs, strict=True):
            if raw is None:
                stream_cls = type(inv.task_output) if isinstance(inv.task_output, Stream) else Stream
                items = self._items(lines, TypeAdapter(stream_cls.item_type()))
                outputs.append(Stream.from_iterator(items))
            else:
                outputs.append(inv.task.output_cls().model_validate(raw))
        return outputs

    async def _items(
        self, lines: AsyncIterator[dict[str, Any]], adapter: TypeAdapter[Any]
    ) -> AsyncIterator[Any]:
        try:
            async for raw in lines:
                line = SessionStreamLine.model_validate(raw)
                if line.end:
                    return
                if line.error is not None:
                    raise TaskExecutionError(line.error.message)
                yield adapter.validate_python(line.item)
        except CornserveError as exc:
            raise TaskExecutionError(self._redact(exc.message)) from exc
        finally:
            await lines.aclose()  # type: ignore[attr-defined]

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(max(self.ttl_s / 3, 1.0))
            try:
                await self.client.call("POST", f"/sessions/{self.session_id}/heartbeat", timeout_s=10)
            except CornserveError as exc:
                logger.warning("%s heartbeat failed: %s", self.owner, self._redact(str(exc)))

    async def close(self) -> None:
        """Release the session's tasks and stop heartbeats."""
        if self.closed:
            return
        self.closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        set_graph_runner(None)
        try:
            await self.client.call("DELETE", f"/sessions/{self.session_id}")
        finally:
            await self.client.close()

    async def __aenter__(self) -> ClusterSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    url: str | None = None,
    ttl_s: float = 60.0,
    *,
    token: str | None = None,
    state_dir: str | Path | None = None,
    ca_file: str | Path | None = None,
) -> ClusterSession:
    """Open a session on the cluster at `url` (default `CORNSERVE_URL`) and make it the graph runner.

    Sessions need the admin token (`token`, else as `CornserveClient` finds it). Use
    `async with await connect() as session: await session.deploy(task); await task(x)`.
    """
    client = CornserveClient(url, token=token, state_dir=state_dir, ca_file=ca_file)
    try:
        info = SessionInfo.model_validate(
            await client.call("POST", "/sessions", SessionCreate(ttl_s=ttl_s).model_dump(exclude_none=True))
        )
    except BaseException:
        await client.close()
        raise
    session = ClusterSession(client, info.session_id, ttl_s, owner=info.owner)
    session._heartbeat = asyncio.create_task(session._beat())
    set_graph_runner(session)
    return session
