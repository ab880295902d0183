"""Sessions and task configs at the trust boundary, through the gateway of the shared cluster.

Session ids are capabilities (unguessable, never listed), TTLs are bounded, sessions have a task
quota and a global cap, and task configs cannot pass executor flags that widen exposure. None of
these tests deploys anything: every refusal happens before the resource manager is asked.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from tests.control.support import call, tasks_by_key

from cornserve.task import serialize_task
from cornserve.task.builtins import CPULLMDescriptor, LLMTask, VLLMDescriptor

MAX_TTL_S = 3600  # the gateway's --session-max-ttl default
MAX_TASKS = 16  # --session-max-tasks default
MAX_OPEN = 64  # --session-max-open default


async def raw_post(http: aiohttp.ClientSession, path: str, text: str) -> tuple[int, Any]:
    """POST a body exactly as written (json.dumps would never write NaN for us by accident)."""
    headers = {"Content-Type": "application/json"}
    async with http.post(path, data=text.encode(), headers=headers) as response:
        return response.status, await response.json()


async def open_session(http: aiohttp.ClientSession, **body: Any) -> dict[str, Any]:
    status, reply = await call(http, "POST", "/sessions", body)
    assert status == 201, reply
    return reply


async def test_session_ids_are_unguessable_capabilities(http: aiohttp.ClientSession) -> None:
    sessions = [await open_session(http) for _ in range(3)]
    try:
        ids = [s["session_id"] for s in sessions]
        assert len(set(ids)) == 3
        for session in sessions:
            sid = session["session_id"]
            assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", sid), sid  # 256 random bits, URL-safe
            owner = session["owner"]
            assert re.fullmatch(r"session:[0-9a-f]{16}", owner) and sid not in owner
            # The owner label, which GET /tasks lists, opens nothing.
            for label in (owner, owner.removeprefix("session:")):
                status, body = await call(http, "POST", f"/sessions/{label}/heartbeat")
                assert status == 404 and body["error"] == "session_not_found", body
            status, body = await call(http, "POST", f"/sessions/{sid}/heartbeat")
            assert status == 200 and body["session_id"] == sid

        # Closed, and never existed, get the same answer.
        status, _ = await call(http, "DELETE", f"/sessions/{ids[0]}")
        assert status == 200
        closed = await call(http, "POST", f"/sessions/{ids[0]}/heartbeat")
        never = await call(http, "POST", "/sessions/" + "A" * 43 + "/heartbeat")
        assert closed == never and closed[0] == 404
        assert ids[0] not in str(closed[1])
    finally:
        for session in sessions[1:]:
            await call(http, "DELETE", f"/sessions/{session['session_id']}")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_json_numbers_are_refused(http: aiohttp.ClientSession, literal: str) -> None:
    status, body = await raw_post(http, "/sessions", f'{{"ttl_s": {literal}}}')
    assert status == 400 and body["error"] == "invalid_json", body
    assert literal.lstrip("-") in body["message"]


@pytest.mark.parametrize("ttl", ["-1", "0", "1e400", str(MAX_TTL_S + 1), '"60"', "true", "[60]"])
async def test_ttls_must_be_finite_positive_and_bounded(http: aiohttp.ClientSession, ttl: str) -> None:
    status, body = await raw_post(http, "/sessions", f'{{"ttl_s": {ttl}}}')
    assert status == 422 and body["error"] == "validation_error", body


async def test_the_largest_ttl_is_accepted_and_unknown_fields_are_not(http: aiohttp.ClientSession) -> None:
    session = await open_session(http, ttl_s=MAX_TTL_S)
    assert session["ttl_s"] == MAX_TTL_S
    assert (await call(http, "DELETE", f"/sessions/{session['session_id']}"))[0] == 200
    status, body = await call(http, "POST", "/sessions", {"ttl": 5})
    assert status == 422 and body["error"] == "validation_error", body


async def test_a_session_may_deploy_only_its_quota_of_tasks(http: aiohttp.ClientSession) -> None:
    specs = [
        serialize_task(LLMTask(model_id=f"quota/model-{i}", descriptor=CPULLMDescriptor()))
        for i in range(MAX_TASKS + 1)
    ]
    before = await tasks_by_key(http)
    session = await open_session(http)
    sid = session["session_id"]
    try:
        status, body = await call(http, "POST", f"/sessions/{sid}/tasks", {"tasks": specs})
        assert status == 403 and body["error"] == "session_quota_exceeded", body
        assert str(MAX_TASKS) in body["message"] and "--session-max-tasks" in body["message"]
        assert await tasks_by_key(http) == before  # refused before anything was deployed
        assert (await call(http, "POST", f"/sessions/{sid}/heartbeat"))[0] == 200  # still usable

        # The same quota when the tasks come with the session.
        status, body = await call(http, "POST", "/sessions", {"tasks": specs})
        assert status == 403 and body["error"] == "session_quota_exceeded", body
    finally:
        await call(http, "DELETE", f"/sessions/{sid}")


async def test_open_sessions_are_capped(http: aiohttp.ClientSession) -> None:
    opened: list[str] = []
    try:
        while True:
            status, body = await call(http, "POST", "/sessions", {})
            if status != 201:
                break
            opened.append(body["session_id"])
            assert len(opened) <= MAX_OPEN, "the cap was not enforced"
        assert status == 503 and body["error"] == "too_many_sessions", body
        assert "--session-max-open" in body["message"]
        async with http.post("/sessions", json={}) as response:
            assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        # One closes: one more may open.
        assert (await call(http, "DELETE", f"/sessions/{opened.pop()}"))[0] == 200
        status, body = await call(http, "POST", "/sessions", {})
        assert status == 201, body
        opened.append(body["session_id"])
    finally:
        for sid in opened:
            await call(http, "DELETE", f"/sessions/{sid}")


def llm_app(extra_args: list[str]) -> str:
    return f"""
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve.task.builtins import LLMTask, VLLMDescriptor

llm = LLMTask(model_id="org/model", descriptor=VLLMDescriptor(extra_args={extra_args!r}))

class Config(AppConfig):
    tasks = {{"llm": llm}}

class Request(BaseModel):
    prompt: str

class Response(BaseModel):
    text: str

async def serve(request: Request) -> Response:
    return Response(text=request.prompt)
"""


@pytest.mark.parametrize(
    ("extra_args", "flag"),
    [(["--host", "0.0.0.0"], "--host"), (["--trust-remote"], "--trust-remote-code")],
)
async def test_task_configs_cannot_pass_exposure_flags(
    http: aiohttp.ClientSession, extra_args: list[str], flag: str
) -> None:
    status, body = await call(http, "POST", "/apps", {"name": "exposed", "source": llm_app(extra_args)})
    assert status == 403 and body["error"] == "executor_flag_refused", body
    assert body["detail"] == {"flag": flag}
    assert f"CORNSERVE_ALLOW_EXECUTOR_FLAGS={flag}" in body["message"]
    assert (await call(http, "GET", "/apps/exposed"))[0] == 404  # nothing was registered

    task = LLMTask(model_id="org/model", descriptor=VLLMDescriptor(extra_args=extra_args))
    status, body = await call(http, "POST", "/sessions", {"tasks": [serialize_task(task)]})
    assert status == 403 and body["error"] == "executor_flag_refused", body
