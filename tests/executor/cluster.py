"""Test harness: real sidecar servers, real executor processes launched from their descriptors,
and a small HTTP dispatcher that drives them the way the dispatcher service does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
from pydantic import TypeAdapter

from cornserve.bus.control import KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import kv_put, open_bucket
from cornserve.bus.micro import NoResponders, RequestTimeout, request
from cornserve.bus.sidecar import InfoReply, InfoRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.runtime.process import free_port
from cornserve.task import (
    Device,
    ExecutorPlacement,
    Stream,
    TaskExecutionError,
    TaskInvocation,
    TaskOutput,
    UnitTask,
    wire_forwards,
)
from cornserve.task.library import load_task_library

LIBRARY_NAME = "tensor-math"
LIBRARY_PATH = Path(__file__).with_name("tasklib_tensor_math.py")
_INVOCATIONS = TypeAdapter(list[TaskInvocation])


def library_source() -> str:
    return LIBRARY_PATH.read_text()


async def upload_library(nats_url: str, name: str, source: str) -> TaskLibraryRecord:
    """What `cornserve tasklib add` does: load it once to learn its classes, then store it in KV."""
    loaded = load_task_library(name, source)
    record = TaskLibraryRecord.from_loaded(source, loaded)
    nc = await nats.connect(nats_url)
    try:
        kv = await open_bucket(nc, KV_TASKLIBS)
        await kv_put(kv, name, record)
    finally:
        await nc.close()
    return record


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.args!r} did not exit within {timeout}s; killed") from None


class SidecarServer:
    """One real `cornserve-sidecar` server process."""

    def __init__(self, rank: int, nats_url: str, log_dir: Path) -> None:
        self.rank, self.nats_url = rank, nats_url
        self.log_path = log_dir / f"sidecar-{rank}.log"
        binary = Path(sys.executable).parent / "cornserve-sidecar"
        cmd = [str(binary), "--rank", str(rank), "--node", "node-a", "--nats-url", nats_url,
               "--arena-bytes", str(32 << 20)]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        nc = await nats.connect(self.nats_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar {self.rank} exited: {self.log_path.read_text()}")
                try:
                    await request(
                        nc, sidecar_subject(self.rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 1.0
                    )
                    return
                except (NoResponders, RequestTimeout):
                    await asyncio.sleep(0.05)
            raise TimeoutError(f"sidecar {self.rank} not ready in {timeout}s")
        finally:
            await nc.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return wait_exit(self.proc, 15)


@dataclass
class Executor:
    """One executor process, launched exactly as a task manager launches it."""

    task: UnitTask[Any, Any]
    executor_id: str
    ranks: list[int]
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    health_path: str
    ready_timeout_s: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_healthy(self) -> dict[str, Any]:
        """Poll the health path until 200 (deadline: the spec's ready_timeout_s, capped for tests)."""
        deadline = time.monotonic() + min(self.ready_timeout_s, 90.0)
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"executor {self.executor_id} exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as resp:
                    body: dict[str, Any] = json.loads(resp.read())
                    return body
            except urllib.error.HTTPError as exc:
                last = f"{exc.code} {exc.read()!r}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"executor {self.executor_id} not healthy in time (last: {last}):\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return wait_exit(self.proc, 30)


def launch_executor(
    task: UnitTask[Any, Any], executor_id: str, ranks: list[int], nats_url: str, log_dir: Path
) -> Executor:
    """Spawn an executor from `task.descriptor.launch_spec(...)`, as the task manager does."""
    port = free_port()
    placement = ExecutorPlacement(
        executor_id=executor_id,
        port=port,
        devices=[Device(kind="cpu", index=r) for r in ranks],
        sidecar_ranks=ranks,
        nats_url=nats_url,
    )
    spec = task.descriptor.launch_spec(task, placement)
    log_path = log_dir / f"executor-{executor_id}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            spec.command,
            env={**os.environ, **spec.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Executor(
        task, executor_id, ranks, spec.port, proc, log_path, spec.health_path, spec.ready_timeout_s
    )


@dataclass
class HttpRunner:
    """Executes graphs against executor processes over HTTP, following the dispatcher's steps.

    JSON round trip of the invocations, forwards wired to the executors' sidecar ranks, each
    request built by the task's descriptor, all sent concurrently; the first failure cancels the rest.
    """

    executors: dict[str, Executor]  # deployment key -> executor
    session: aiohttp.ClientSession
    timeout: float = 60.0
    responses: list[int] = field(default_factory=list)

    def route(self, invocations: Sequence[TaskInvocation]) -> list[TaskInvocation]:
        wire = _INVOCATIONS.validate_json(_INVOCATIONS.dump_json(list(invocations)))
        wire_forwards(wire, [self.executors[inv.task.deployment_key].ranks for inv in wire])
        return wire

    async def run_one(self, position: int, inv: TaskInvocation) -> TaskOutput:
        executor = self.executors[inv.task.deployment_key]
        descriptor = inv.task.descriptor
        req = descriptor.to_request(inv.task, inv)
        resp = await self.session.request(req.method, executor.url + req.path, json=req.body)
        self.responses.append(resp.status)
        if resp.status != 200:
            try:
                message = (await resp.json())["error"]
            finally:
                resp.release()
            raise TaskExecutionError(message, task_name=inv.task.display_name(), position=position)
        if req.stream:
            return Stream.from_iterator(self._lines(descriptor, inv, resp))
        try:
            return descriptor.from_response(inv.task, inv, await resp.json())
        finally:
            resp.release()

    @staticmethod
    async def _lines(
        descriptor: Any, inv: TaskInvocation, resp: aiohttp.ClientResponse
    ) -> AsyncIterator[Any]:
        try:
            async with asyncio.timeout(60):
                async for raw in resp.content:
                    item = descriptor.from_stream_line(inv.task, inv, raw.decode())
                    if item is not None:
                        yield item
        finally:
            resp.release()

    async def run_graph(self, invocations: Sequence[TaskInvocation]) -> list[TaskOutput]:
        wire = self.route(invocations)
        try:
            async with asyncio.timeout(self.timeout), asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.run_one(i, inv)) for i, inv in enumerate(wire)]
        except* TaskExecutionError as failed:
            raise failed.exceptions[0] from None
        return [t.result() for t in tasks]
