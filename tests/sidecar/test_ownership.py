"""Two clusters of one user on one machine: a starting sidecar removes only what crashed instances left.

Real server processes on two real nats-servers (two clusters, each with node ``node-a`` and the same
rank), real arenas and sockets under /dev/shm.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tests.support.sidecars import SIDECAR_RANKS, start_sidecars

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.sidecar import Sidecar
from cornserve.sidecar.arena import SHM_DIR
from cornserve.sidecar.ownership import OwnedDir, owned_by_a_live_process


@pytest.mark.slow  # two clusters' sidecars and a second nats-server
async def test_a_second_cluster_with_the_same_rank_leaves_the_first_ones_arena_and_socket(
    nats_url: str, tmp_path: Path
) -> None:
    rank = SIDECAR_RANKS.next()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (first,) = await start_sidecars([rank], nats_url, tmp_path / "one")
    try:
        info = await first.wait_ready()
        arena, socket = SHM_DIR / info.arena, Path(info.local_socket)
        assert arena.exists() and socket.exists()
        with NatsServerProcess() as other_nats:
            (second,) = await start_sidecars([rank], other_nats.url, tmp_path / "two")
            try:
                other = await second.wait_ready()
                assert other.instance != info.instance
                assert arena.exists() and socket.exists(), (
                    "the second cluster's sidecar removed the first's files"
                )
                assert "removed arenas of crashed instances" not in second.log()
                # The first cluster still works end to end: its clients map its arena and use its socket.
                async with Sidecar(rank, nats_url) as src, Sidecar(rank, nats_url) as dst:
                    await src.send(torch.arange(1000.0), "still-here", [[rank]])
                    assert torch.equal(await dst.recv("still-here", timeout=10), torch.arange(1000.0))
                    await dst.mark_done("still-here")
            finally:
                second.stop()
    finally:
        first.stop()


@pytest.mark.slow  # a sidecar killed and restarted
async def test_a_crashed_instances_arena_and_socket_are_removed_at_the_next_start(
    nats_url: str, tmp_path: Path
) -> None:
    rank = SIDECAR_RANKS.next()
    (server,) = await start_sidecars([rank], nats_url, tmp_path)
    try:
        old = await server.wait_ready()
        server.kill()  # SIGKILL: nothing of its own clean-up runs
        arena, socket_dir = SHM_DIR / old.arena, Path(old.local_socket).parent
        assert arena.exists() and socket_dir.exists()
        assert not owned_by_a_live_process(arena) and not owned_by_a_live_process(socket_dir)
        server.restart()
        new = await server.wait_ready(not_instance=old.instance)
        assert not arena.exists() and not socket_dir.exists()
        assert (SHM_DIR / new.arena).exists() and owned_by_a_live_process(SHM_DIR / new.arena)
        assert "removed arenas of crashed instances" in server.log()
    finally:
        server.stop()


def test_ownership_is_the_holders_until_it_releases_or_dies(tmp_path: Path) -> None:
    owned = OwnedDir(tmp_path)
    child = os.fork()
    if child == 0:  # another process sees the lock
        os._exit(0 if owned_by_a_live_process(tmp_path) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    owned.release()
    assert not owned_by_a_live_process(tmp_path)
    assert not owned_by_a_live_process(tmp_path / "gone")
