"""The pytest plugin every test directory uses (registered in tests/conftest.py).

Fixtures:
    nats_server / nats_url   one real nats-server (JetStream) for the whole session
    private_nats             a nats-server of the requesting module's own (no shared subjects)
    tiny_checkpoint          `tiny_checkpoint(arch, seed=0) -> Path`, each built once per session
    sidecars                 `await sidecars(n, nodes=..., arena_bytes=..., ttl=...)` -> ready servers
                             (ranks 100-299), stopped after the test, which fails if one logged a traceback
    stats_of                 `await stats_of([ranks])` -> StatsReply per rank
    arenas_empty             `await arenas_empty([ranks])`: until those sidecars hold nothing (frees are async)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from tests.support.sidecars import SIDECAR_RANKS, MiB, SidecarProcess, sidecar_stats, start_sidecars
from tests.support.waiting import wait_for

from cornserve.bus.sidecar import StatsReply
from cornserve.cli.natsserver import NatsServerProcess

StartSidecars = Callable[..., Awaitable[list[SidecarProcess]]]
StatsOf = Callable[[list[int]], Awaitable[dict[int, StatsReply]]]
ArenasEmpty = Callable[..., Awaitable[None]]
TinyCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServerProcess]:
    """A real nats-server on a free loopback port, shared by the whole session."""
    with NatsServerProcess() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServerProcess) -> str:
    """URL of the session's nats-server."""
    return nats_server.url


@pytest.fixture(scope="module")
def private_nats() -> Iterator[NatsServerProcess]:
    """A nats-server of the module's own, so no other test's services share its subjects."""
    with NatsServerProcess() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """`tiny_checkpoint(arch, seed=0)`: a tiny seeded checkpoint, built once per session (seconds each)."""
    from cornserve.models.tiny import build_tiny  # torch: only for the tests that ask

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    built: dict[tuple[str, int], Path] = {}

    def get(arch: str, seed: int = 0) -> Path:
        if (arch, seed) not in built:
            built[arch, seed] = build_tiny(arch, root / f"{arch}-seed{seed}", seed=seed)
        return built[arch, seed]

    return get


@pytest.fixture
async def sidecars(nats_url: str, tmp_path: Path) -> AsyncIterator[StartSidecars]:
    """Factory: `await sidecars(n, nodes=..., arena_bytes=..., ttl=...)` -> running servers, fresh ranks."""
    started: list[SidecarProcess] = []

    async def start(
        n: int, nodes: list[str] | None = None, arena_bytes: int = 64 * MiB, ttl: float = 300.0
    ) -> list[SidecarProcess]:
        ranks = [SIDECAR_RANKS.next() for _ in range(n)]
        procs = await start_sidecars(
            ranks, nats_url, tmp_path, nodes=nodes, arena_bytes=arena_bytes, ttl_s=ttl
        )
        started.extend(procs)
        return procs

    yield start
    for p in started:
        p.stop()
    for p in started:
        log = p.log()
        assert "Traceback" not in log, f"sidecar {p.rank} logged a traceback:\n{log}"


@pytest.fixture
def stats_of(nats_url: str) -> StatsOf:
    """`await stats_of([ranks])` -> StatsReply per rank."""

    async def get(ranks: list[int]) -> dict[int, StatsReply]:
        return await sidecar_stats(nats_url, ranks)

    return get


@pytest.fixture
def arenas_empty(stats_of: StatsOf) -> ArenasEmpty:
    """`await arenas_empty([ranks], timeout=20.0)`: until every one of those arenas is back to 0 bytes.

    Frees happen on the servers after the last receiver's ack, so leak checks wait for them (with a
    deadline) instead of asserting at once.
    """

    async def wait(ranks: list[int], timeout: float = 20.0) -> None:
        async def empty() -> bool:
            return all(s.used_bytes == 0 for s in (await stats_of(ranks)).values())

        await wait_for(empty, timeout, f"the arenas of ranks {ranks} to be empty", interval=0.05)

    return wait
