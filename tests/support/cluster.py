"""A real local cluster (as `cornserve up` runs it) for tests that go through the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cornserve.cli.launcher import LocalCluster
from cornserve.runtime.process import free_port, pid_alive


@contextmanager
def running_cluster(state_dir: Path, cpu_slots: int = 4, dispatchers: int = 2) -> Iterator[LocalCluster]:
    """Start a cluster on a free port; on exit stop it and check nothing of it survived.

    Nothing means no child process and no shared-memory file of its sidecars.
    """
    cluster = LocalCluster(
        state_dir=state_dir,
        port=free_port(),
        cpu_slots=cpu_slots,
        dispatchers=dispatchers,
        say=lambda *_: None,
    )
    try:
        cluster.start(ready_timeout_s=180)
        yield cluster
    finally:
        cluster.stop()
    for child in cluster.children:
        assert child.proc is not None and not pid_alive(child.proc.pid), f"{child.name} outlived the cluster"
    assert not list(Path("/dev/shm").glob(f"cornserve-sidecar-{cluster.node}-*"))
