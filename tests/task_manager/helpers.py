"""Shared by the task-manager and resource-manager tests: a task library with an echo unit task,
its upload to the KV bucket, and process helpers (real processes, found through /proc)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from cornserve.bus.control import KV_TASKLIBS, TaskLibraryRecord
from cornserve.bus.kv import kv_put, open_bucket
from cornserve.bus.micro import NoResponders, RequestTimeout
from cornserve.task import UnitTask, serialize_task
from cornserve.task.library import LoadedLibrary, load_task_library

EXECUTOR_SCRIPT = Path(__file__).with_name("echo_executor.py")
LIBRARY_NAME = "cs-test-echo"

LIBRARY_SOURCE = """
import sys

from cornserve.task import ExecutorLaunchSpec, ExecutorRequest, TaskExecutionDescriptor, TaskInput, TaskOutput, UnitTask

EXECUTOR_SCRIPT = @SCRIPT@


class EchoInput(TaskInput):
    text: str


class EchoOutput(TaskOutput):
    text: str
    executor_id: str


class EchoTask(UnitTask[EchoInput, EchoOutput]):
    default_descriptor = "EchoDescriptor"
    label: str
    devices: int = 1
    crash: bool = False


class EchoDescriptor(TaskExecutionDescriptor[EchoTask]):
    def num_devices(self, task):
        return task.devices

    def launch_spec(self, task, context):
        command = [
            sys.executable, EXECUTOR_SCRIPT,
            "--host", context.host, "--port", str(context.port),
            "--executor-id", context.executor_id,
            "--ranks", ",".join(map(str, context.sidecar_ranks)),
        ]
        if task.crash:
            command.append("--crash")
        return ExecutorLaunchSpec(command=command, env={"ECHO_LABEL": task.label}, port=context.port, ready_timeout_s=60)

    def to_request(self, task, invocation):
        return ExecutorRequest(path="/echo", body={"text": invocation.task_input.text})
""".replace("@SCRIPT@", repr(str(EXECUTOR_SCRIPT)))


def load_library() -> LoadedLibrary:
    """Load the library into the test process (as an app author's process would)."""
    return load_task_library(LIBRARY_NAME, LIBRARY_SOURCE)


def echo_task(label: str, **kwargs: Any) -> UnitTask[Any, Any]:
    task = load_library().module.EchoTask(label=label, **kwargs)
    assert isinstance(task, UnitTask)
    return task


async def upload_library(nc: Client) -> None:
    """Store the library in KV_TASKLIBS, where services' TaskLibrarySync finds it."""
    lib = load_library()
    kv = await open_bucket(nc, KV_TASKLIBS)
    record = TaskLibraryRecord.from_loaded(LIBRARY_SOURCE, lib)
    await kv_put(kv, LIBRARY_NAME, record)


def spec_of(task: UnitTask[Any, Any]) -> dict[str, Any]:
    return serialize_task(task)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def pids_matching(*needles: str) -> list[int]:
    """Live processes whose command line contains every needle."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline and all(n in cmdline for n in needles) and alive(int(entry)):
            found.append(int(entry))
    return found


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll an (async or sync) predicate until it returns something truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def wait_answering(
    proc: subprocess.Popen[bytes],
    probe: Callable[[], Awaitable[object]],
    name: str,
    log_text: Callable[[], str],
    timeout: float,
) -> None:
    """Wait until the service `proc` runs answers `probe`; fail at once (with its log) if it exits."""

    async def answers() -> bool:
        assert proc.poll() is None, f"{name} exited: {log_text()}"
        try:
            await probe()
        except (NoResponders, RequestTimeout):
            return False
        return True

    await wait_for(answers, timeout, f"the {name} to answer")


async def wait_gone(pids: list[int], timeout: float = 20.0) -> None:
    await wait_for(lambda: not [p for p in pids if alive(p)], timeout, f"pids {pids} to exit")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"pid {proc.pid} did not exit within {timeout}s of SIGTERM") from None
    return proc.returncode


def python_module(module: str, *args: str, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def connect(nats_url: str) -> Client:
    return await nats.connect(nats_url)
