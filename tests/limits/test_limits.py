"""Payload limits and deadlines, end to end on a real local cluster (issue 11).

* a request body, or a graph, larger than the bus's `max_payload` is refused with 413 before any
  work starts (the executor never sees it);
* an output several times larger than the bus carries reaches the caller whole (the dispatcher
  sends it in parts), and one larger than the gateway's `--max-reply-bytes` comes back as a typed
  502 `output_too_large`; either way the graph ran exactly once (it is not retried);
* `--request-timeout` bounds an invocation: 504 within the deadline + 1 s;
* an app source that loops at import fails with 422 within `--app-load-timeout` + 1 s while the
  gateway keeps answering, and a further load is refused with 503 while that thread still runs.

The cluster runs with short deadlines (set in its environment), so this directory has its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.limits.big_executor import pattern
from tests.support.cluster import gateway_session, running_local_cluster

from cornserve.cli.launcher import LocalCluster

REQUEST_TIMEOUT_S = 4.0
APP_MAX_CONCURRENCY = 2
APP_MAX_QUEUE = 2
APP_LOAD_TIMEOUT_S = 3.0
MiB = 1024 * 1024
MAX_REPLY_BYTES = 8 * MiB
"""The gateway's --max-reply-bytes here; the bus carries 1 MiB (nats-server's default max_payload)."""
EXECUTOR = Path(__file__).parent / "big_executor.py"

TASKLIB = """
import sys

from cornserve.task import ExecutorLaunchSpec, ExecutorRequest, TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask


class BigInput(TaskInput):
    text: str
    size: int
    hold_s: float = 0.0
    busy: bool = False


class BigOutput(TaskOutput):
    text: str


class BigTask(UnitTask[BigInput, BigOutput]):
    default_descriptor = "BigDescriptor"
    count_file: str


class BigDescriptor(TaskExecutionDescriptor[BigTask]):
    def num_devices(self, task):
        return 1

    def launch_spec(self, task, context):
        command = [
            sys.executable, @SCRIPT@,
            "--host", context.host, "--port", str(context.port),
            "--executor-id", context.executor_id,
        ]
        return ExecutorLaunchSpec(
            command=command, env={"BIG_COUNT_FILE": task.count_file}, port=context.port, ready_timeout_s=60
        )

    def to_request(self, task, invocation):
        i = invocation.task_input
        return ExecutorRequest(
            path="/big", body={"text": i.text, "size": i.size, "hold_s": i.hold_s, "busy": i.busy}
        )
""".replace("@SCRIPT@", repr(str(EXECUTOR)))

APP = """
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve_tasklibs.cs_test_big import BigInput, BigTask

big = BigTask(count_file=@COUNT@)

class Config(AppConfig):
    tasks = {"big": big}

class Request(BaseModel):
    text: str = ""
    repeat: int = 1
    size: int = 10
    hold_s: float = 0.0

class Response(BaseModel):
    length: int

async def serve(request: Request) -> Response:
    out = await big(BigInput(text=request.text * request.repeat, size=request.size, hold_s=request.hold_s))
    return Response(length=len(out.text))
"""

# Returns the task's output text itself (the large-reply case: it must arrive byte for byte).
ECHO_APP = APP.replace("length: int", "text: str").replace(
    "Response(length=len(out.text))", "Response(text=out.text)"
)

# Streams one item (after one quick task call), then stalls past the request deadline in the driver.
STALLING_STREAM_APP = """
import asyncio
from collections.abc import AsyncIterator
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve_tasklibs.cs_test_big import BigInput, BigTask

big = BigTask(count_file=@COUNT@)

class Config(AppConfig):
    tasks = {"big": big}

class Request(BaseModel):
    stall_s: float

class Response(BaseModel):
    index: int

async def serve(request: Request) -> AsyncIterator[Response]:
    out = await big(BigInput(text="s", size=1))
    yield Response(index=len(out.text) - 1)
    await asyncio.sleep(request.stall_s)
    yield Response(index=1)
"""

LOOPING_APP = "while True:\n    pass\n"

# Streams `items` lines, `gap_s` apart, after one task call (which the executor refuses with 429 when `busy`).
OVERLOAD_APP = """
import asyncio
from collections.abc import AsyncIterator
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve_tasklibs.cs_test_big import BigInput, BigTask

big = BigTask(count_file=@COUNT@)

class Config(AppConfig):
    tasks = {"big": big}
    @LIMIT@

class Request(BaseModel):
    items: int = 4
    gap_s: float = 0.2
    busy: bool = False

class Response(BaseModel):
    index: int
    text: str

async def serve(request: Request) -> AsyncIterator[Response]:
    out = await big(BigInput(text="o", size=64, busy=request.busy))
    for index in range(request.items):
        yield Response(index=index, text=out.text)
        await asyncio.sleep(request.gap_s)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster whose gateway has short deadlines and one app-load slot."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORNSERVE_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
        mp.setenv("CORNSERVE_APP_LOAD_TIMEOUT", str(APP_LOAD_TIMEOUT_S))
        mp.setenv("CORNSERVE_APP_LOAD_MAX_RUNNING", "1")
        mp.setenv("CORNSERVE_APP_MAX_CONCURRENCY", str(APP_MAX_CONCURRENCY))
        mp.setenv("CORNSERVE_APP_MAX_QUEUE", str(APP_MAX_QUEUE))
        mp.setenv("CORNSERVE_MAX_REPLY_BYTES", str(MAX_REPLY_BYTES))
        with running_local_cluster(tmp_path_factory.mktemp("cluster"), cpu_slots=2) as cluster:
            yield cluster


@pytest.fixture(scope="module")
def count_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("count") / "requests"
    path.touch()
    return path


@pytest.fixture
async def http(cluster: LocalCluster) -> AsyncIterator[aiohttp.ClientSession]:
    async with gateway_session(cluster, timeout_s=300) as session:
        yield session


@pytest.fixture
async def big_app(http: aiohttp.ClientSession, count_file: Path) -> AsyncIterator[str]:
    """The app `limits-big` (its task library uploaded first), unregistered afterwards."""
    async with http.post("/tasklibs", json={"name": "cs-test-big", "source": TASKLIB}) as resp:
        assert resp.status == 201, await resp.text()
    source = APP.replace("@COUNT@", repr(str(count_file)))
    async with http.post("/apps", json={"name": "limits-big", "source": source}) as resp:
        assert resp.status == 201, await resp.text()
    yield "/apps/limits-big/invoke"
    async with http.delete("/apps/limits-big") as resp:
        assert resp.status == 200, await resp.text()


@asynccontextmanager
async def registered_app(http: aiohttp.ClientSession, name: str, source: str) -> AsyncIterator[str]:
    """The app `name` registered from `source` for the block (its invoke path), unregistered after it."""
    async with http.post("/apps", json={"name": name, "source": source}) as resp:
        assert resp.status == 201, await resp.text()
    try:
        yield f"/apps/{name}/invoke"
    finally:
        async with http.delete(f"/apps/{name}") as resp:
            assert resp.status == 200, await resp.text()


def executions(count_file: Path) -> int:
    return len(count_file.read_text().splitlines())


async def invoke(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = io.BytesIO(json.dumps(body).encode())  # (aiohttp warns about large raw bodies)
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def test_payload_limits(http: aiohttp.ClientSession, big_app: str, count_file: Path) -> None:
    status, body = await invoke(http, big_app, {"text": "ok"})
    assert (status, body) == (200, {"length": 10})
    assert executions(count_file) == 1

    # A request body larger than the bus carries: refused before the app runs.
    status, body = await invoke(http, big_app, {"text": "a" * (2 * MiB)})
    assert status == 413, body
    assert body["error"] == "payload_too_large"
    assert "file:" in body["message"]

    # A small request whose app builds a graph larger than the bus carries: refused before sending.
    status, body = await invoke(http, big_app, {"text": "b" * (300 * 1024), "repeat": 6})
    assert status == 413, body
    assert body["error"] == "payload_too_large"
    assert "bytes" in body["message"]
    assert executions(count_file) == 1  # neither reached an executor

    # An output larger than the gateway takes: a typed error at once, and the graph ran exactly once.
    status, body = await invoke(http, big_app, {"text": "c", "size": 2 * MAX_REPLY_BYTES})
    assert status == 502, body
    assert body["error"] == "output_too_large"
    assert f"({MAX_REPLY_BYTES} bytes)" in body["message"], body
    assert executions(count_file) == 2

    # The cluster still serves normally.
    status, body = await invoke(http, big_app, {"text": "ok", "size": 5})
    assert (status, body) == (200, {"length": 5})


async def test_large_output_reaches_the_caller_whole(
    http: aiohttp.ClientSession, big_app: str, count_file: Path
) -> None:
    """An output five times what one bus message carries: the whole answer, byte for byte, once."""
    source = ECHO_APP.replace("@COUNT@", repr(str(count_file)))
    async with registered_app(http, "limits-echo", source) as url:
        before = executions(count_file)
        size = 5 * MiB
        async with http.post(url, json={"text": "d", "size": size}) as resp:
            raw = await resp.read()
            assert resp.status == 200, raw[:500]
        text = json.loads(raw)["text"]
        assert len(text) == size
        assert text == pattern(size)  # every part, in order
        assert executions(count_file) == before + 1  # ran once: a big reply is not a lost replica


async def test_request_timeout(http: aiohttp.ClientSession, big_app: str) -> None:
    started = time.monotonic()
    status, body = await invoke(http, big_app, {"text": "slow", "hold_s": REQUEST_TIMEOUT_S + 4})
    assert status == 504, body
    assert body["error"] == "request_timeout"
    assert time.monotonic() - started < REQUEST_TIMEOUT_S + 1


async def test_request_timeout_bounds_the_whole_stream(
    http: aiohttp.ClientSession, big_app: str, count_file: Path
) -> None:
    source = STALLING_STREAM_APP.replace("@COUNT@", repr(str(count_file)))
    async with registered_app(http, "limits-stall", source) as url:
        started = time.monotonic()
        async with http.post(url, json={"stall_s": REQUEST_TIMEOUT_S + 4}) as resp:
            assert resp.status == 200
            lines = [json.loads(line) for line in (await resp.text()).splitlines() if line.strip()]
        assert time.monotonic() - started < REQUEST_TIMEOUT_S + 1
        assert lines[0] == {"index": 0}
        assert lines[-1]["error"] == "request_timeout", lines
        assert len(lines) == 2


OVERLOAD_FACTOR = 10
"""Concurrent streams sent at once, in multiples of the app's capacity (running + queued slots)."""
REFUSAL_DEADLINE_S = 0.1
"""The issue's bound on a 429: from sending the request to receiving its status."""
RSS_GROWTH_LIMIT = 32 * MiB
"""What the overload may add to the gateway's resident memory (see the test's docstring)."""


def gateway_rss(cluster: LocalCluster) -> int:
    """The gateway process's resident memory in bytes (VmRSS)."""
    child = next(c for c in cluster.children if c.name == "gateway")
    assert child.proc is not None
    for line in Path(f"/proc/{child.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in the gateway's /proc status")


async def _headers_sent(_: aiohttp.ClientSession, ctx: Any, __: Any) -> None:
    ctx.trace_request_ctx["sent"] = time.monotonic()


def timed_session(cluster: LocalCluster) -> aiohttp.ClientSession:
    """A session on the gateway (admin token) that notes when each request's headers went out."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_headers_sent)
    return aiohttp.ClientSession(
        base_url=cluster.url,
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        timeout=aiohttp.ClientTimeout(total=60),
        trace_configs=[trace],
    )


async def slow_stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One invoke read by a slow client: its status, headers and lines (read slowly), and timings.

    `status_after` runs from the moment the request's headers were sent (a `timed_session`) to the
    moment its status arrived; `called_after` from the call, so it also counts this client's own
    connection set-up and event-loop queueing among many concurrent requests.
    """
    marks: dict[str, float] = {}
    called = time.monotonic()
    async with http.post(url, json=body, trace_request_ctx=marks) as resp:
        arrived = time.monotonic()
        lines: list[Any] = []
        if resp.status == 200:
            async for raw in resp.content:
                if raw.strip():
                    lines.append(json.loads(raw))
                await asyncio.sleep(0.05)  # a slow reader
        else:
            lines.append(await resp.json())
        return {
            "status": resp.status,
            "status_after": arrived - marks.get("sent", called),
            "called_after": arrived - called,
            "retry_after": resp.headers.get("Retry-After"),
            "lines": lines,
        }


async def test_overload_refuses_the_excess_fast(
    http: aiohttp.ClientSession, big_app: str, cluster: LocalCluster, count_file: Path
) -> None:
    """Admission control (issue 11): 10x the app's capacity of concurrent slow-read streams.

    The gateway runs at most APP_MAX_CONCURRENCY invocations of an app and queues APP_MAX_QUEUE;
    every further request must get `429 overloaded` with Retry-After within 100 ms of being sent
    (measured per request, send to status, on a loaded 2-core machine: refusing takes a dict
    lookup and a counter check, so the margin is the event loops'), every admitted stream must
    finish whole, and nothing may be a 5xx. The gateway's resident memory may not grow by more
    than RSS_GROWTH_LIMIT: the excess requests' bodies are never read and no app code runs for
    them, so what the overload costs is a few connections' buffers, far below the limit; a gateway
    that ran every request at once (no admission) holds 40 drivers, graphs and streams instead.
    """
    source = OVERLOAD_APP.replace("@COUNT@", repr(str(count_file)))
    async with http.post(
        "/apps", json={"name": "limits-overload", "source": source.replace("@LIMIT@", "")}
    ) as resp:
        assert resp.status == 201, await resp.text()
    off = source.replace("@LIMIT@", "max_concurrency = 0")
    async with http.post("/apps", json={"name": "limits-off", "source": off}) as resp:
        assert resp.status == 201, await resp.text()
    url = "/apps/limits-overload/invoke"
    timed = timed_session(cluster)
    try:
        warm = await slow_stream(http, url, {"items": 2, "gap_s": 0})
        assert warm["status"] == 200, warm
        rss_before = gateway_rss(cluster)

        capacity = APP_MAX_CONCURRENCY + APP_MAX_QUEUE
        results = await asyncio.gather(
            *(slow_stream(timed, url, {"items": 4, "gap_s": 0.2}) for _ in range(OVERLOAD_FACTOR * capacity))
        )
        rss_after = gateway_rss(cluster)
        statuses = sorted({r["status"] for r in results})
        admitted = [r for r in results if r["status"] == 200]
        refused = [r for r in results if r["status"] == 429]
        slowest = max((r["status_after"] for r in refused), default=0.0)
        slowest_call = max((r["called_after"] for r in refused), default=0.0)
        median = sorted(r["status_after"] for r in refused)[len(refused) // 2] if refused else 0.0
        print(
            f"overload: {len(results)} streams, {len(admitted)} admitted, {len(refused)} refused with 429 "
            f"(429 after sending: median {median * 1000:.1f} ms, slowest {slowest * 1000:.1f} ms; slowest after the call {slowest_call * 1000:.1f} ms), gateway RSS "
            f"{rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB"
        )
        assert set(statuses) <= {200, 429}, statuses  # no 5xx, nothing else
        assert len(admitted) >= capacity  # the first `capacity` arrivals always get a slot
        assert len(refused) >= len(results) - 2 * capacity, f"{len(admitted)} admitted"
        for r in admitted:
            assert [line["index"] for line in r["lines"]] == [0, 1, 2, 3], r  # finished whole, no error line
        for r in refused:
            assert r["lines"][0]["error"] == "overloaded", r
            assert r["retry_after"] == "1", r
            assert r["status_after"] < REFUSAL_DEADLINE_S, r
        assert rss_after - rss_before < RSS_GROWTH_LIMIT

        # Every slot was given back: the app serves again at once.
        again = await slow_stream(http, url, {"items": 1, "gap_s": 0})
        assert again["status"] == 200, again

        # An executor whose bounded queue is full answers 429: the client gets 429 with its Retry-After.
        busy = await slow_stream(http, url, {"items": 1, "busy": True})
        assert (busy["status"], busy["lines"][0]["error"], busy["retry_after"]) == (429, "overloaded", "7"), (
            busy
        )

        # An app declaring no capacity at all: 503.
        off_result = await slow_stream(http, "/apps/limits-off/invoke", {"items": 1})
        assert (off_result["status"], off_result["lines"][0]["error"]) == (503, "no_capacity"), off_result
    finally:
        await timed.close()
        for name in ("limits-overload", "limits-off"):
            async with http.delete(f"/apps/{name}") as resp:
                assert resp.status == 200, await resp.text()


async def admission_of(http: aiohttp.ClientSession, app: str) -> dict[str, int]:
    """The app's invocations running and queued, as GET /apps/{name} reports them."""
    async with http.get(f"/apps/{app}") as resp:
        assert resp.status == 200, await resp.text()
        counts: dict[str, int] = (await resp.json())["admission"]
        return counts


async def wait_admission(http: aiohttp.ClientSession, app: str, **expected: int) -> None:
    """Until the app's admission counts include `expected`; fails after HANG_UP_DEADLINE_S."""
    loop = asyncio.get_running_loop()
    end = loop.time() + HANG_UP_DEADLINE_S
    while not expected.items() <= (seen := await admission_of(http, app)).items():
        assert loop.time() < end, f"admission of {app} is {seen}, not {expected} after {HANG_UP_DEADLINE_S} s"
        await asyncio.sleep(0.05)


HANG_UP_DEADLINE_S = 2.0
"""How soon a queued request whose client hung up must have left the queue."""


async def test_a_client_that_hangs_up_while_queued_leaves_the_queue(
    http: aiohttp.ClientSession, big_app: str, cluster: LocalCluster, count_file: Path
) -> None:
    """One slot, one queue place: the queued request's client hangs up; its place is free at once.

    Before, the dead request stayed queued until the running one ended, took the slot, and only
    then noticed its client was gone: meanwhile every other request was refused with 429.
    """
    source = OVERLOAD_APP.replace("@COUNT@", repr(str(count_file)))
    limits = "max_concurrency = 1\n    max_queue = 1"
    async with http.post(
        "/apps", json={"name": "limits-queue", "source": source.replace("@LIMIT@", limits)}
    ) as resp:
        assert resp.status == 201, await resp.text()
    url = "/apps/limits-queue/invoke"
    quitter_session = gateway_session(cluster, timeout_s=60)
    try:
        before = executions(count_file)
        # The one slot: a stream that holds it ~3.5 s (within the 4 s request deadline).
        holder = asyncio.create_task(slow_stream(http, url, {"items": 1, "gap_s": 3.5}))
        await wait_admission(http, "limits-queue", running=1)
        # The one queue place: a request whose client then hangs up.
        quitter = asyncio.create_task(quitter_session.post(url, json={"items": 1, "gap_s": 0}))
        await wait_admission(http, "limits-queue", running=1, waiting=1)
        full = await slow_stream(http, url, {"items": 1})
        assert full["status"] == 429, full  # the queue is full indeed
        quitter.cancel()
        await asyncio.gather(quitter, return_exceptions=True)
        await quitter_session.close()  # the client is gone: its connection closes
        await wait_admission(http, "limits-queue", running=1, waiting=0)
        assert not holder.done()  # it left the queue while the slot was still taken
        # Its place, and then the slot, go to the next request.
        later = await slow_stream(http, url, {"items": 1, "gap_s": 0})
        assert later["status"] == 200, later
        assert (await holder)["status"] == 200
        assert executions(count_file) == before + 2  # the request that hung up never ran
        assert await admission_of(http, "limits-queue") == {"running": 0, "waiting": 0}
    finally:
        await quitter_session.close()
        async with http.delete("/apps/limits-queue") as resp:
            assert resp.status == 200, await resp.text()


async def test_looping_app_source(http: aiohttp.ClientSession, cluster: LocalCluster) -> None:
    """Runs last: its thread spins until the gateway exits (that is the documented limit)."""

    async def register() -> tuple[int, dict[str, Any], float]:
        started = time.monotonic()
        async with http.post("/apps", json={"name": "limits-loop", "source": LOOPING_APP}) as resp:
            return resp.status, await resp.json(), time.monotonic() - started

    registering = asyncio.create_task(register())
    health_checks = 0
    async with gateway_session(cluster, timeout_s=2, anonymous=True) as probe:
        while not registering.done():
            async with probe.get("/health") as resp:  # answers within 2 s while the source spins
                assert resp.status == 200, await resp.text()
            health_checks += 1
            await asyncio.sleep(0.2)
    status, body, elapsed = await registering
    assert status == 422, body
    assert body["error"] == "app_load_timeout"
    assert elapsed < APP_LOAD_TIMEOUT_S + 1
    assert health_checks >= 2

    # The spinning thread holds the one load slot: another registration is refused at once.
    status, body, _ = await register()
    assert status == 503, body
    assert body["error"] == "app_loader_busy"
    async with http.get("/apps/limits-loop") as resp:
        assert resp.status == 404  # nothing was registered
