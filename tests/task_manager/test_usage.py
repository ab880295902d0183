"""`RemoteUsage`: dispatcher replicas' usage reports become in-flight numbers and routed counts."""

from __future__ import annotations

from cornserve.bus.control import ExecutorUsage
from cornserve.task_manager.usage import RemoteUsage


def usage(replica: str, routed: dict[str, int], outstanding: dict[str, int] | None = None) -> ExecutorUsage:
    return ExecutorUsage(
        replica_id=replica,
        instance="i1",
        version=1,
        outstanding=outstanding or {},
        routed=routed,
        interval_s=1,
    )


def test_cumulative_routed_counts_become_deltas_once_each() -> None:
    remote = RemoteUsage()
    assert remote.record(usage("d0", {"e0": 3}), now=0) == {"e0": 3}
    # The periodic copy of the same counts adds nothing; new calls add only themselves.
    assert remote.record(usage("d0", {"e0": 3}), now=0.5) == {}
    assert remote.record(usage("d0", {"e0": 5, "e1": 1}), now=1) == {"e0": 2, "e1": 1}
    # Another replica counts on its own.
    assert remote.record(usage("d1", {"e0": 2}), now=1) == {"e0": 2}


def test_a_replica_restarted_under_the_same_id_counts_from_zero() -> None:
    remote = RemoteUsage()
    remote.record(usage("d0", {"e0": 7}), now=0)
    # Lower than before: a new process with the same id; its whole count is new.
    assert remote.record(usage("d0", {"e0": 2}), now=1) == {"e0": 2}
    assert remote.record(usage("d0", {"e0": 4}), now=2) == {"e0": 2}
