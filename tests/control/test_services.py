"""End to end on the shared cluster: streamed deployment and responses, the notebook/SDK path,
a gateway restart, and malformed NATS messages on every service's subjects.

One streaming app (MakeMatrix -> sidecar -> RowSums) is registered once for the module, with
`Accept: text/event-stream`, and every test uses it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER
from tests.control.apps import ROWS_APP
from tests.control.support import admin_nats, call, ensure_tasklib, tasks_by_key
from tests.control.support import tensor_math as tm_lib
from tests.support.cluster import gateway_session

from cornserve.bus.control import (
    DISPATCH_INVOKE,
    DISPATCHER_SERVICE_NAME,
    RM_DEPLOY,
    RM_RELEASE,
    RM_SCALE,
    RM_SERVICE_NAME,
    RM_STATE,
    TM_SERVICE_NAME,
    InvokeRequest,
    tm_subject,
)
from cornserve.bus.subjects import SIDECAR_SERVICE_NAME, SidecarVerb, sidecar_subject
from cornserve.cli.launcher import LocalCluster
from cornserve.client import connect
from cornserve.task import Task, TaskInput

DEADLINE = 120.0
APP = "rows"


def row_sums(seed: int, n: int) -> list[float]:
    return [float(v) for v in tm_lib.make_matrix_tensor(seed, n, n).sum(dim=1)]


async def read_sse(response: aiohttp.ClientResponse) -> list[tuple[str, Any]]:
    """Every (event, JSON data) of a server-sent event stream."""
    events: list[tuple[str, Any]] = []
    event = "message"
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((event, json.loads(line[len("data: ") :])))
            event = "message"
    return events


async def register_with_progress(cluster: LocalCluster) -> list[tuple[str, Any]]:
    async with gateway_session(cluster, timeout_s=300) as http:
        await ensure_tasklib(http)
        async with http.post(
            "/apps", json={"name": APP, "source": ROWS_APP}, headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status == 201
            assert response.headers["Content-Type"].startswith("text/event-stream")
            return await read_sse(response)


async def unregister(cluster: LocalCluster) -> None:
    async with gateway_session(cluster, timeout_s=300) as http:
        status, body = await call(http, "DELETE", f"/apps/{APP}")
        assert status == 200, body


@pytest.fixture(scope="module")
def rows_app(cluster: LocalCluster) -> Iterator[list[tuple[str, Any]]]:
    """Register the streaming app with SSE progress; yields the events; unregisters it.

    Sync (its own short event loops) so that it can be module-scoped under function-scoped loops.
    """
    events = asyncio.run(register_with_progress(cluster))
    yield events
    asyncio.run(unregister(cluster))


async def test_deploy_progress_streams_as_sse(rows_app: list[tuple[str, Any]]) -> None:
    kinds = [kind for kind, _ in rows_app]
    assert kinds[-2:] == ["done", "end"], kinds
    progress = [data for kind, data in rows_app if kind == "progress"]
    stages = {(p["task_key"].split("-")[0], p["stage"]) for p in progress}
    for task in ("makematrix", "rowsums"):  # which tasks, which executors, ready
        assert (task, "starting_executors") in stages and (task, "ready") in stages, stages
    assert any("e0" in p["message"] for p in progress if p["stage"] == "starting_executors")
    done = rows_app[-2][1]
    assert done["name"] == APP and done["state"] == "ready" and len(done["tasks"]) == 2


async def test_streaming_invoke_ndjson_and_sse(rows_app: Any, http: aiohttp.ClientSession) -> None:
    expected = row_sums(7, 5)
    async with http.post(f"/apps/{APP}/invoke", json={"seed": 7, "n": 5}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in response.content if line.strip()]
    assert [item["index"] for item in lines] == list(range(5))
    assert [item["sum"] for item in lines] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    async with http.post(
        f"/apps/{APP}/invoke", json={"seed": 7, "n": 5}, headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(response)
    assert events[-1][0] == "end"
    items = [data for kind, data in events[:-1]]
    assert [item["sum"] for item in items] == pytest.approx(expected, rel=1e-4, abs=1e-4)


async def test_the_callers_request_id_travels_with_its_graphs(
    rows_app: Any, http: aiohttp.ClientSession, cluster: LocalCluster
) -> None:
    """`X-Request-Id` names the graphs the request sends to the dispatchers (their log lines carry it)."""
    nc = await admin_nats(cluster)
    seen: list[str] = []

    async def copy(msg: Any) -> None:  # a plain subscriber sees every request the queue group gets
        seen.append(InvokeRequest.model_validate_json(msg.data).request_id)

    sub = await nc.subscribe(DISPATCH_INVOKE, cb=copy)
    await nc.flush()  # the server knows the subscription before the first graph is published
    try:
        request_id = f"trace-{os.getpid()}-rows"
        bogus = "x" * 200  # not a plain token of at most 128 characters: not trusted
        for header in (request_id, bogus):
            async with http.post(
                f"/apps/{APP}/invoke", json={"seed": 2, "n": 3}, headers={"X-Request-Id": header}
            ) as response:
                assert response.status == 200
                assert len([line async for line in response.content if line.strip()]) == 3
        await nc.flush()
    finally:
        await sub.unsubscribe()
        await nc.close()
    assert request_id in seen
    assert bogus not in seen and all(0 < len(rid) <= 128 for rid in seen)
    assert len(set(seen)) == 2  # the untrusted header's request got an id of its own


class SumInput(TaskInput):
    seed: int
    n: int


class MatrixSum(Task[SumInput, tm_lib.ReduceOutput]):
    """Composite run by the SDK session: MakeMatrix -> (sidecar) -> Reduce."""

    def post_init(self) -> None:
        self.make = tm_lib.MakeMatrix()
        self.reduce = tm_lib.Reduce()

    def invoke(self, x: SumInput) -> tm_lib.ReduceOutput:
        matrix = self.make.invoke(tm_lib.MakeMatrixInput(seed=x.seed, rows=x.n, cols=x.n)).matrix
        return self.reduce.invoke(tm_lib.ReduceInput(x=matrix))


async def test_sdk_session_deploys_invokes_and_releases(
    rows_app: Any, cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    task = MatrixSum()
    async with asyncio.timeout(DEADLINE):
        session = await connect(cluster.url, ttl_s=60, token=cluster.admin_token)
        async with session:
            owner = session.owner  # the session's fingerprint: its id is a capability, never listed
            assert owner.startswith("session:") and session.session_id not in owner
            keys = await session.deploy(task)
            assert len(keys) == 2
            tasks = await tasks_by_key(http)
            assert all(owner in tasks[k]["users"] for k in keys)
            async with http.get("/tasks") as response:
                assert session.session_id not in await response.text()
            make_key = next(k for k in keys if k.startswith("makematrix-"))
            assert f"app:{APP}" in tasks[make_key]["users"]  # shared with the app: deployed once

            out = await task(SumInput(seed=3, n=6))
            assert out.sum == pytest.approx(
                float(tm_lib.make_matrix_tensor(3, 6, 6).sum()), rel=1e-4, abs=1e-3
            )
            outs = await asyncio.gather(*(task(SumInput(seed=s, n=4)) for s in range(5)))
            for seed, o in enumerate(outs):
                assert o.sum == pytest.approx(
                    float(tm_lib.make_matrix_tensor(seed, 4, 4).sum()), rel=1e-4, abs=1e-3
                )

        # Disconnected: Reduce (only the session used it) is torn down, MakeMatrix keeps the app.
        tasks = await tasks_by_key(http)
        reduce_key = next(k for k in keys if k.startswith("reduce-"))
        assert reduce_key not in tasks
        assert tasks[make_key]["users"] == [f"app:{APP}"]


async def test_gateway_restart_recovers_apps(
    rows_app: Any, cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    gateway = next(c for c in cluster.children if c.name == "gateway")
    assert gateway.proc is not None
    os.killpg(gateway.proc.pid, signal.SIGKILL)
    await asyncio.to_thread(gateway.proc.wait, 30)
    await asyncio.to_thread(cluster.restart, "gateway")
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                assert gateway.alive(), "the restarted gateway exited"
                try:
                    status, _ = await call(http, "GET", "/health")
                except aiohttp.ClientError:
                    status = 0
                if status == 200:
                    break
                await asyncio.sleep(0.2)
            while True:  # the new gateway reloads the apps from the KV bucket in the background
                status, apps = await call(http, "GET", "/apps")
                assert status == 200, apps
                if any(a["name"] == APP and a["state"] == "ready" for a in apps):
                    break
                await asyncio.sleep(0.2)
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(
            f"the gateway did not recover ({exc!r}); its log:\n{gateway.log_tail(40)}"
        ) from exc
    async with http.post(f"/apps/{APP}/invoke", json={"seed": 2, "n": 3}) as response:
        assert response.status == 200
        lines = [json.loads(line) async for line in response.content if line.strip()]
    assert [item["sum"] for item in lines] == pytest.approx(row_sums(2, 3), rel=1e-4, abs=1e-4)


GARBAGE = [b"", b"not json", b"[1, 2]", b'{"bogus": true}']


async def expect_error_replies(nc: Client, subject: str) -> None:
    for payload in GARBAGE:
        msg = await nc.request(subject, payload, timeout=30)
        code = (msg.headers or {}).get(ERROR_CODE_HEADER)
        assert code is not None and code.startswith("4"), (subject, payload, msg.headers, msg.data[:200])


async def answer_ping(nc: Client, service: str, expected: int) -> int:
    """How many instances of a micro service answer a PING (waiting up to 10 s for `expected`)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.PING.{service}", b"", reply=inbox)
    count = 0
    deadline = asyncio.get_running_loop().time() + 10.0
    try:
        while count < expected and (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            count += 1
    finally:
        await sub.unsubscribe()
    return count


async def test_malformed_messages_get_error_replies_and_nobody_dies(
    rows_app: Any, cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    assert cluster.nats_url is not None
    tasks = await tasks_by_key(http)
    task_key = next(k for k in tasks if k.startswith("makematrix-"))
    nc = await admin_nats(cluster)
    try:
        expected = {
            RM_SERVICE_NAME: 1,
            TM_SERVICE_NAME: len(tasks),
            DISPATCHER_SERVICE_NAME: 2,
            SIDECAR_SERVICE_NAME: 4,
        }
        for name, count in expected.items():
            assert await answer_ping(nc, name, count) == count, name
        async with asyncio.timeout(DEADLINE):
            for subject in (RM_DEPLOY, RM_RELEASE, RM_STATE, RM_SCALE, DISPATCH_INVOKE):
                await expect_error_replies(nc, subject)
            for verb in ("route", "status", "assign", "shutdown"):
                await expect_error_replies(nc, tm_subject(task_key, verb))  # type: ignore[arg-type]
            for payload in GARBAGE:  # fire-and-forget subject: nothing to answer, nothing to break
                await nc.publish(tm_subject(task_key, "done"), payload)
            for verb in (
                SidecarVerb.INFO,
                SidecarVerb.ALLOC,
                SidecarVerb.SEND,
                SidecarVerb.RECV,
                SidecarVerb.DELIVER,
            ):
                await expect_error_replies(nc, sidecar_subject(0, verb))
            await nc.flush()
        for name, count in expected.items():  # every instance still answers
            assert await answer_ping(nc, name, count) == count, name
    finally:
        await nc.close()
    for child in cluster.children:
        assert child.alive(), f"{child.name} died"
    # Still serving: the streaming app end to end (RM state, TM routes, dispatcher, sidecars).
    async with http.post(f"/apps/{APP}/invoke", json={"seed": 1, "n": 2}) as response:
        assert response.status == 200
        lines = [json.loads(line) async for line in response.content if line.strip()]
    assert [item["sum"] for item in lines] == pytest.approx(row_sums(1, 2), rel=1e-4, abs=1e-4)


async def test_the_graph_of_a_registered_app_over_http_and_from_the_cli(
    rows_app: Any, http: aiohttp.ClientSession, cluster: LocalCluster
) -> None:
    """POST /apps/{name}/graph traces the registered app (nothing runs); `cornserve graph NAME` prints it."""
    status, body = await call(http, "POST", f"/apps/{APP}/graph", {"seed": 1, "n": 3})
    assert status == 200, body
    assert body["name"] == APP and len(body["graphs"]) == 1 and len(body["dots"]) == 1
    mermaid = body["graphs"][0]
    assert mermaid.startswith("flowchart") and "MakeMatrix" in mermaid and "RowSums" in mermaid, mermaid
    status, body = await call(http, "POST", f"/apps/{APP}/graph", {"seed": "not a number"})
    assert status == 422, body
    status, body = await call(http, "POST", "/apps/no-such-app/graph", {"seed": 1})
    assert status == 404, body

    env = {**os.environ, "CORNSERVE_URL": cluster.url, "CORNSERVE_STATE_DIR": str(cluster.state_dir)}
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cornserve.cli.main", "graph", APP, '{"seed": 1, "n": 3}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    printed = out.stdout.strip().splitlines()  # the same graph (labels carry each trace's own ids)
    assert printed[0] == "flowchart LR" and len(printed) == len(mermaid.strip().splitlines()), out.stdout
    assert "MakeMatrix" in out.stdout and "RowSums" in out.stdout
