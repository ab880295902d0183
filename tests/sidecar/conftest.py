"""Fixtures that spawn real ``cornserve-sidecar`` server processes."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import pytest

from cornserve.bus.micro import NoResponders, RequestTimeout, request
from cornserve.bus.sidecar import InfoReply, InfoRequest, StatsReply, StatsRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject

_ranks = itertools.count(100)
MiB = 1024 * 1024


def sidecar_binary() -> str:
    path = Path(sys.executable).parent / "cornserve-sidecar"
    assert path.exists(), f"console script missing at {path}; run uv sync"
    return str(path)


TORCHLESS_SERVER = (
    "import sys; sys.modules.update(torch=None, numpy=None); "
    "from cornserve.sidecar.server import main; main()"
)
"""Runs the ``cornserve-sidecar`` entry point with torch and numpy made unimportable: every test
proves the server needs neither (a sidecar host does not install them)."""


class SidecarProc:
    """One real sidecar server process."""

    def __init__(
        self, rank: int, node: str, nats_url: str, arena_bytes: int, ttl: float, log_dir: Path
    ) -> None:
        self.rank, self.node, self.nats_url = rank, node, nats_url
        self.arena_bytes, self.ttl = arena_bytes, ttl
        self.log_path = log_dir / f"sidecar-{rank}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        sidecar_binary()  # the console script is installed (the guard below runs the same main)
        cmd = [
            sys.executable, "-c", TORCHLESS_SERVER,
            "--rank", str(self.rank),
            "--node", self.node,
            "--nats-url", self.nats_url,
            "--arena-bytes", str(self.arena_bytes),
            "--ttl-seconds", str(self.ttl),
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    async def wait_ready(self, timeout: float = 30.0, not_instance: str | None = None) -> InfoReply:
        nc = await nats.connect(self.nats_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar {self.rank} exited: {self.log_path.read_text()}")
                try:
                    info = await request(
                        nc, sidecar_subject(self.rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 1.0
                    )
                    if info.instance != not_instance:
                        return info
                except (NoResponders, RequestTimeout):
                    pass
                await asyncio.sleep(0.05)
            raise TimeoutError(f"sidecar {self.rank} not ready in {timeout}s: {self.log_path.read_text()}")
        finally:
            await nc.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


StartSidecars = Callable[..., Awaitable[list[SidecarProc]]]


@pytest.fixture
async def sidecars(nats_url: str, tmp_path: Path) -> AsyncIterator[StartSidecars]:
    """Factory: ``await sidecars(n, nodes=..., arena_bytes=..., ttl=...)`` -> running servers, fresh ranks."""
    started: list[SidecarProc] = []

    async def start(
        n: int, nodes: list[str] | None = None, arena_bytes: int = 64 * MiB, ttl: float = 300.0
    ) -> list[SidecarProc]:
        procs = []
        for i in range(n):
            node = nodes[i] if nodes else "node-a"
            p = SidecarProc(next(_ranks), node, nats_url, arena_bytes, ttl, tmp_path)
            p.spawn()
            procs.append(p)
            started.append(p)
        await asyncio.gather(*(p.wait_ready() for p in procs))
        return procs

    yield start
    for p in started:
        p.stop()
    for p in started:
        log = p.log_path.read_text() if p.log_path.exists() else ""
        assert "Traceback" not in log, f"sidecar {p.rank} logged a traceback:\n{log}"


async def arena_stats(nats_url: str, ranks: list[int]) -> dict[int, StatsReply]:
    """Stats of several servers (helper for leak assertions)."""
    nc = await nats.connect(nats_url)
    try:
        out = {}
        for r in ranks:
            out[r] = await request(nc, sidecar_subject(r, SidecarVerb.STATS), StatsRequest(), StatsReply, 5.0)
        return out
    finally:
        await nc.close()


StatsOf = Callable[[list[int]], Awaitable[dict[int, StatsReply]]]


@pytest.fixture
def stats_of(nats_url: str) -> StatsOf:
    """``await stats_of([ranks])`` -> StatsReply per rank."""

    async def get(ranks: list[int]) -> dict[int, StatsReply]:
        return await arena_stats(nats_url, ranks)

    return get


@pytest.fixture
def env_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CORNSERVE_NATS_URL", nats_url)
    return nats_url
