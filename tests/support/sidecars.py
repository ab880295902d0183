"""Real `cornserve-sidecar` servers for tests, with the rank ranges that keep test directories apart.

Sidecar ranks are global on a nats-server, and several directories keep sidecars alive for a whole
module or session on the shared server, so each directory draws its ranks from its own `RankRange`:

    tests/sidecar, tests/vllm  100-299      tests/executor       300-399
    tests/llm_executor         400-499      tests/eric           500-599
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nats
from tests.support.processes import ServiceProcess, console_script
from tests.support.waiting import wait_for

from cornserve.bus.micro import NoResponders, RequestTimeout, request
from cornserve.bus.sidecar import InfoReply, InfoRequest, StatsReply, StatsRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.runtime.secrets import new_token, read_secret_file, write_secret_file

MiB = 1024 * 1024
READY_DEADLINE_S = 60.0

TORCHLESS_SERVER = (
    "import sys; sys.modules.update(torch=None, numpy=None); "
    "from cornserve.sidecar.server import main; main()"
)
"""Runs the `cornserve-sidecar` entry point with torch and numpy made unimportable: every test that
starts a sidecar server proves the server needs neither (a sidecar host does not install them)."""


@functools.cache
def peer_secret_file() -> Path:
    """The peer secret every test sidecar of this pytest process shares (as `cornserve up` gives one).

    One per process (removed at exit): sidecars started by different fixtures still authenticate
    each other over TCP.
    """
    folder = Path(tempfile.mkdtemp(prefix="cornserve-test-peers-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_secret_file(folder / "sidecar-secret", new_token())


def peer_secret() -> bytes:
    """The shared peer secret itself (tests that speak the TCP handshake by hand)."""
    return read_secret_file(peer_secret_file()).encode()


class RankRange:
    """Fresh sidecar ranks from [start, stop); running out is an error, not a collision."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self._next = itertools.count(start)

    def next(self) -> int:
        rank = next(self._next)
        assert rank < self.stop, f"ranks {self.start}-{self.stop - 1} are used up"
        return rank


SIDECAR_RANKS = RankRange(100, 300)
EXECUTOR_RANKS = RankRange(300, 400)
LLM_EXECUTOR_RANKS = RankRange(400, 500)
ERIC_RANKS = RankRange(500, 600)


@dataclass
class SidecarProcess:
    """One real sidecar server process (its rank, node and the process behind it)."""

    rank: int
    node: str
    nats_url: str
    service: ServiceProcess

    @classmethod
    def start(
        cls,
        rank: int,
        nats_url: str,
        log_dir: Path,
        *,
        node: str = "node-a",
        arena_bytes: int = 64 * MiB,
        ttl_s: float | None = None,
        peer_secret: Path | None = None,
    ) -> SidecarProcess:
        """Start one server; `peer_secret` defaults to the shared file (pass a path to use another)."""
        console_script("cornserve-sidecar")  # installed (the guard below runs the same main)
        cmd = [
            sys.executable, "-c", TORCHLESS_SERVER,
            "--rank", str(rank),
            "--node", node,
            "--nats-url", nats_url,
            "--arena-bytes", str(arena_bytes),
            *(["--ttl-seconds", str(ttl_s)] if ttl_s is not None else []),
            "--peer-secret-file", str(peer_secret or peer_secret_file()),
        ]  # fmt: skip
        return cls(rank, node, nats_url, ServiceProcess.start(f"sidecar-{rank}", cmd, log_dir))

    @property
    def log_path(self) -> Path:
        return self.service.log_path

    def log(self) -> str:
        return self.service.log()

    async def wait_ready(
        self, timeout: float = READY_DEADLINE_S, not_instance: str | None = None
    ) -> InfoReply:
        """Until the server answers INFO (from an instance other than `not_instance`, after a restart)."""
        nc = await nats.connect(self.nats_url)
        try:

            async def info() -> InfoReply | None:
                try:
                    reply = await request(
                        nc, sidecar_subject(self.rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 1.0
                    )
                except (NoResponders, RequestTimeout):
                    return None
                return reply if reply.instance != not_instance else None

            ready: InfoReply = await wait_for(
                info, timeout, f"sidecar {self.rank} to answer INFO", process=self.service, interval=0.05
            )
            return ready
        finally:
            await nc.close()

    def restart(self) -> None:
        self.service.restart()

    def stop(self) -> int:
        return self.service.stop()

    def kill(self) -> None:
        self.service.kill()


async def start_sidecars(
    ranks: Iterable[int],
    nats_url: str,
    log_dir: Path,
    *,
    nodes: Iterable[str] | None = None,
    arena_bytes: int = 64 * MiB,
    ttl_s: float | None = None,
) -> list[SidecarProcess]:
    """Start one server per rank (on `nodes`, default all on node-a) and wait until every one answers."""
    ranks = list(ranks)
    node_list = list(nodes) if nodes is not None else ["node-a"] * len(ranks)
    started = [
        SidecarProcess.start(rank, nats_url, log_dir, node=node, arena_bytes=arena_bytes, ttl_s=ttl_s)
        for rank, node in zip(ranks, node_list, strict=True)
    ]
    try:
        await asyncio.gather(*(s.wait_ready() for s in started))
    except BaseException:
        for s in started:
            if s.service.running:
                s.kill()
        raise
    return started


async def sidecar_stats(nats_url: str, ranks: Iterable[int]) -> dict[int, StatsReply]:
    """STATS of several servers (for leak assertions: every arena back to empty)."""
    nc = await nats.connect(nats_url)
    try:
        out = {}
        for r in ranks:
            out[r] = await request(nc, sidecar_subject(r, SidecarVerb.STATS), StatsRequest(), StatsReply, 5.0)
        return out
    finally:
        await nc.close()
