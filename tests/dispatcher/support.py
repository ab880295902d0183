"""Helpers for the dispatcher tests: real dispatcher processes on a real nats-server.

The dispatcher is what is tested; the resource manager, the task managers and the executors are
stand-ins at the boundary (in-test NATS responders and small aiohttp servers), so each test can
make them answer, stall, fail or vanish on purpose. Forwarded data between the stand-in executors
goes through an in-test store, the sidecar's job in a cluster.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from tests.support.processes import ServiceProcess, python_module
from tests.support.tasklibs import TaskLibrarySource
from tests.support.waiting import wait_for, wait_log

from cornserve.bus.control import (
    RM_EVENTS,
    RM_STATE,
    STREAM_PUBLISHED_HEADER,
    STREAM_SUBJECT_HEADER,
    ClusterState,
    DeploymentEvent,
    DeploymentInfo,
    PublishedStreamEnd,
    RouteDone,
    RouteReply,
    RouteRequest,
    StateRequest,
    stream_items_message,
    tm_subject,
)
from cornserve.task import LocalForwardStore, UnitTask, serialize_task

LIBRARY = TaskLibrarySource.from_file("dispatcher-test", Path(__file__).parent / "tasklib.py")
READY_LINE = "serving cornserve.dispatch.invoke"


# ----- dispatcher processes ------------------------------------------------------------------------


class DispatcherReplica:
    """One real dispatcher replica process."""

    def __init__(self, url: str, replica_id: str, log_dir: Path, *extra: str) -> None:
        self.url = url
        self.replica_id = replica_id
        cmd = python_module(
            "cornserve.dispatcher.main",
            "--nats-url", url,
            "--replica-id", replica_id,
            "--route-timeout", "3",
            "--state-timeout", "2",
            "--drain-timeout", "10",
            *extra,
        )  # fmt: skip
        self.service = ServiceProcess.start(f"dispatcher-{replica_id}", cmd, log_dir)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.proc

    def log(self) -> str:
        return self.service.log()

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_log(self.service, READY_LINE, timeout)

    async def wait_log(self, text: str, timeout: float = 30.0) -> None:
        await wait_for(lambda: text in self.log(), timeout, f"dispatcher {self.replica_id} to log {text!r}")

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        return self.service.stop()

    def kill(self) -> None:
        self.service.kill()


def start_dispatchers(url: str, ids: list[str], log_dir: Path) -> list[DispatcherReplica]:
    procs = [DispatcherReplica(url, replica_id, log_dir) for replica_id in ids]
    for p in procs:
        p.wait_ready()
    return procs


def stop_dispatchers(procs: list[DispatcherReplica], killed: tuple[str, ...] = ()) -> None:
    for p in procs:
        if p.replica_id in killed:
            continue
        p.stop()
        p.service.assert_clean_exit(stopped_line=None)


# ----- stand-ins: executors, task managers, resource manager ---------------------------------------


class FakeExecutor:
    """A small HTTP executor for the test tasks; records what it was asked."""

    def __init__(self, executor_id: str, store: LocalForwardStore) -> None:
        self.executor_id = executor_id
        self.store = store
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.cancelled = asyncio.Event()
        self.gate = asyncio.Event()
        self.held = 0
        self.url = ""
        self.publish_nc: Client | None = None
        """Set: `generate` publishes its stream itself when the dispatcher names a subject (as the LLM executor)."""
        self.published = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        name = request.match_info["name"]
        self.requests.append((name, body))
        try:
            return await self._serve(name, body, request)
        except (asyncio.CancelledError, ConnectionResetError):
            # Dropped by its caller: aiohttp cancels the handler, or, when the drop lands while the
            # handler writes, the write raises ConnectionResetError instead.
            self.cancelled.set()
            raise

    async def _serve(self, name: str, body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        inp, outs = body["input"], body["outputs"]
        if (inp.get("fail") or "").startswith("reject:"):
            message = inp["fail"][len("reject:") :].strip()
            return web.json_response({"error": {"type": "invalid_request", "message": message}}, status=400)
        if inp.get("fail"):
            return web.Response(status=500, text=f"{name} exploded: {inp['fail']}")
        if name == "echo":
            if inp["hold"]:
                self.held += 1
                await asyncio.wait_for(self.gate.wait(), 60)
            if inp["delay_s"]:
                await asyncio.sleep(inp["delay_s"])
            return web.json_response({"text": inp["text"].upper(), "executor": self.executor_id})
        if name == "produce":
            self.store.put(outs[0]["id"], np.asarray(inp["values"], dtype=np.float64))
            return web.json_response({})
        if name == "scale":
            data = await self.store.get(inp["tensor"]["id"], timeout=60)
            self.store.put(outs[0]["id"], data * inp["factor"])
            return web.json_response({})
        if name == "sum":
            total = 0.0
            for fwd in inp["tensors"]:
                total += float(np.sum(await self.store.get(fwd["id"], timeout=60)))
            return web.json_response({"total": total})
        if name == "generate":
            if inp["tensor"] is not None:
                await self.store.get(inp["tensor"]["id"], timeout=60)
            subject = request.headers.get(STREAM_SUBJECT_HEADER)
            if subject is not None and self.publish_nc is not None:
                return await self._publish_generate(inp, request, self.publish_nc, subject)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            for i in range(inp["count"]):
                if i == inp["stall_at"]:
                    await asyncio.sleep(300)
                line = "BAD" if i == inp["bad_line_at"] else f'{{"index": {i}, "text": "tok{i}"}}'
                if i == inp["count"] - 1:
                    await response.write_eof(line.encode() + b"\n")  # with the end, as the LLM executor
                else:
                    await response.write(line.encode() + b"\n")
            await response.write_eof()  # a no-op after the last line
            return response
        if name == "think":  # a stream forward: item i under "<id>/<i>", then None under "<id>/<count>"
            fid = outs[0]["id"]
            for i in range(inp["count"]):
                if i == inp["fail_at"]:
                    return web.Response(status=500, text=f"think exploded at step {i}")
                if i == 1 and inp["hold_after_first"]:
                    self.held += 1
                    await asyncio.wait_for(self.gate.wait(), 60)
                self.store.put(f"{fid}/{i}", float(i))
            self.store.put(f"{fid}/{inp['count']}", None)
            return web.json_response({})
        if name == "speak":
            fid = inp["hidden"]["id"]
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            i = 0
            while (value := await self.store.get(f"{fid}/{i}", timeout=60)) is not None:
                await response.write(f'{{"index": {i}, "text": "said {value}"}}'.encode() + b"\n")
                i += 1
            await response.write_eof()
            return response
        return web.Response(status=404, text=f"no such task {name}")

    async def _publish_generate(
        self, inp: dict[str, Any], request: web.Request, nc: Client, subject: str
    ) -> web.StreamResponse:
        """`generate`'s tokens as StreamMessages on `subject`; the body's last line says how it ended."""
        response = web.StreamResponse(headers={STREAM_PUBLISHED_HEADER: "1"})
        await response.prepare(request)
        self.published += 1
        seq = 0
        for i in range(inp["count"]):
            if i == inp["stall_at"]:
                await asyncio.sleep(300)
            if i == inp["bad_line_at"]:
                end = PublishedStreamEnd(messages=seq, items=seq, end=False, line="BAD")
                await response.write_eof(end.model_dump_json().encode() + b"\n")
                return response
            item = f'{{"index": {i}, "text": "tok{i}"}}'.encode()
            await nc.publish(subject, stream_items_message(seq, [item], end=i == inp["count"] - 1))
            seq += 1
            await response.write(b"\n")
        await response.write_eof(
            PublishedStreamEnd(messages=seq, items=seq, end=True).model_dump_json().encode() + b"\n"
        )
        return response


class StandInTM:
    """A task manager stand-in: answers route (or stays silent) and records RouteDone."""

    def __init__(self, nc: Client, key: str, executor: FakeExecutor, ranks: list[int], mode: str) -> None:
        self.nc, self.key, self.executor, self.ranks, self.mode = nc, key, executor, ranks, mode
        self.done: list[str] = []
        self.routes = 0
        self._subs: list[Any] = []

    async def start(self) -> None:
        if self.mode == "absent":
            return
        self._subs.append(await self.nc.subscribe(tm_subject(self.key, "route"), cb=self._on_route))
        self._subs.append(await self.nc.subscribe(tm_subject(self.key, "done"), cb=self._on_done))
        await self.nc.flush()

    async def close(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def _on_route(self, msg: Msg) -> None:
        req = RouteRequest.model_validate_json(msg.data)
        self.routes += 1
        if self.mode == "silent":
            return
        reply = RouteReply(
            request_id=req.request_id,
            executor_id=self.executor.executor_id,
            url=self.executor.url,
            sidecar_ranks=self.ranks,
        )
        await msg.respond(reply.model_dump_json().encode())

    async def _on_done(self, msg: Msg) -> None:
        self.done.append(RouteDone.model_validate_json(msg.data).executor_id)

    async def wait_done(self, count: int, timeout: float = 30.0) -> list[str]:
        async with asyncio.timeout(timeout):
            while len(self.done) < count:
                await asyncio.sleep(0.02)
        return self.done


class StandInControlPlane:
    """The stand-in resource manager, task managers and executors around the dispatchers of one test."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.store = LocalForwardStore()
        self.deployments: dict[str, DeploymentInfo] = {}
        self.tms: dict[str, StandInTM] = {}
        self.executors: list[FakeExecutor] = []
        self.state_queries = 0
        self._rm_sub: Any = None

    async def start_rm(self) -> None:
        self._rm_sub = await self.nc.subscribe(RM_STATE, cb=self._on_state)
        await self.nc.flush()

    async def _on_state(self, msg: Msg) -> None:
        req = StateRequest.model_validate_json(msg.data)
        self.state_queries += 1
        state = ClusterState(
            request_id=req.request_id, deployments=list(self.deployments.values()), devices=[]
        )
        await msg.respond(state.model_dump_json().encode())

    async def deploy(
        self, task: UnitTask[Any, Any], ranks: list[int], *, tm: str = "answer", announce: bool = True
    ) -> tuple[FakeExecutor, StandInTM]:
        key = task.deployment_key
        executor = FakeExecutor(f"{type(task).__name__.lower()}-exec-{len(self.executors)}", self.store)
        await executor.start()
        self.executors.append(executor)
        manager = StandInTM(self.nc, key, executor, ranks, tm)
        await manager.start()
        self.tms[key] = manager
        info = DeploymentInfo(task_key=key, task=serialize_task(task), state="ready", users=["test"])
        self.deployments[key] = info
        if announce:
            await self._publish("ready", info)
        return executor, manager

    async def remove(self, task: UnitTask[Any, Any]) -> None:
        info = self.deployments.pop(task.deployment_key)
        await self._publish("removed", info)

    async def _publish(self, kind: str, info: DeploymentInfo) -> None:
        event = DeploymentEvent(kind=kind, deployment=info)  # type: ignore[arg-type]
        await self.nc.publish(RM_EVENTS, event.model_dump_json().encode())
        await self.nc.flush()

    async def close(self) -> None:
        for info in list(self.deployments.values()):
            await self._publish("removed", info)
        self.deployments.clear()
        if self._rm_sub is not None:
            await self._rm_sub.unsubscribe()
        for manager in self.tms.values():
            await manager.close()
        for executor in self.executors:
            executor.gate.set()
            await executor.close()
