"""A tiny service and executor on the runtime, run as real processes by the tests in this directory.

`python tests/runtime/demo_service.py [service|executor] --flags...`
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, ClassVar, Literal

from nats.aio.client import Client
from pydantic import Field

from cornserve.runtime.logging import request_context
from cornserve.runtime.service import run_executor, run_service, stop_callback
from cornserve.runtime.settings import Flag, OnOff, ProcessInfo, ServiceSettings, SidecarRanks

logger = logging.getLogger("demo")


class DemoStartupError(RuntimeError):
    """The configured, expected start-up failure."""


class DemoSettings(ServiceSettings):
    process: ClassVar[ProcessInfo] = ProcessInfo("demo", "demo-service")

    port: int = Field(default=1, gt=0, lt=65536)
    greeting: str = "hello"
    wait_s: Annotated[float, Flag(name="--wait")] = 0.0
    drain_s: float = 0.0
    fail: Literal["none", "expected", "bug"] = "none"
    switch: bool = False
    batching: OnOff = True
    sidecar_ranks: SidecarRanks = Field(default_factory=list)
    secret: Annotated[str, Flag(env_only=True)] = "unset"
    deadline_s: float = 60.0
    stop_after_s: float | None = None
    stop_code: int = 0

    @property
    def stop_deadline_s(self) -> float:
        return self.deadline_s


@asynccontextmanager
async def serve(settings: DemoSettings, nc: Client) -> AsyncIterator[None]:
    logger.info("starting")
    logger.info("loop module %s", type(asyncio.get_running_loop()).__module__.split(".")[0])
    await asyncio.sleep(settings.wait_s)
    if settings.fail == "expected":
        raise DemoStartupError("configured to fail")
    if settings.fail == "bug":
        raise KeyError("a bug")
    await nc.publish("demo.started", b"")
    with request_context("req-42"):
        logger.info("handling a request")
    logger.info("settings %s", settings.model_dump_json())
    if settings.stop_after_s is not None:
        asyncio.get_running_loop().call_later(settings.stop_after_s, stop_callback(settings.stop_code))
    try:
        yield
    finally:
        await asyncio.sleep(settings.drain_s)
        logger.info("drained")


class DemoExecutor:
    """An executor whose initialisation waits `wait_s`, then succeeds or fails."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings

    async def start_http(self) -> None:
        logger.info("port open")

    async def initialize(self) -> None:
        await asyncio.sleep(self.settings.wait_s)
        if self.settings.fail == "expected":
            raise DemoStartupError("configured to fail")
        if self.settings.fail == "bug":
            raise KeyError("a bug")

    async def stop(self) -> None:
        logger.info("executor stopped")


if __name__ == "__main__":
    kind, argv = sys.argv[1], sys.argv[2:]
    if kind == "executor":
        sys.exit(run_executor(DemoSettings, DemoExecutor, argv=argv, expected_errors=(DemoStartupError,)))
    sys.exit(run_service(DemoSettings, serve, argv=argv, expected_errors=(DemoStartupError,)))
