"""What dispatcher replicas routed from this task manager's executor table and have not finished.

Dispatchers route from the table the task manager publishes (`table.py`) without asking it, so the
task manager learns their outstanding invocations from their `ExecutorUsage` reports instead of a
route request and a `RouteDone` per invocation. A replica silent for its report's stale window is
forgotten: it died or lost its connection, and its calls went with it. Transport-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cornserve.bus.control import ExecutorTable, ExecutorUsage


@dataclass
class _Report:
    usage: ExecutorUsage
    received: float


@dataclass
class RemoteUsage:
    """The latest report of every live dispatcher replica."""

    _reports: dict[str, _Report] = field(default_factory=dict)
    _routed: dict[str, dict[str, int]] = field(default_factory=dict)
    """The last cumulative `routed` counts seen from each replica (kept after it goes silent, so a
    replica that comes back under the same id is not counted twice)."""

    def record(self, usage: ExecutorUsage, now: float | None = None) -> dict[str, int]:
        """Keep `usage` as its replica's latest report; return what it routed since its last one.

        The counts are cumulative per replica; one lower than before means the replica restarted
        under the same id, so its whole count is new.
        """
        self._reports[usage.replica_id] = _Report(usage, time.monotonic() if now is None else now)
        seen = self._routed.setdefault(usage.replica_id, {})
        new: dict[str, int] = {}
        for executor_id, count in usage.routed.items():
            count = max(0, count)
            before = seen.get(executor_id, 0)
            delta = count - before if count >= before else count
            if delta:
                new[executor_id] = delta
            seen[executor_id] = count
        return new

    def _live(self, now: float | None = None) -> list[ExecutorUsage]:
        now = time.monotonic() if now is None else now
        live: list[ExecutorUsage] = []
        for replica, report in list(self._reports.items()):
            if now - report.received > ExecutorTable.STALE_INTERVALS * report.usage.interval_s:
                del self._reports[replica]
            else:
                live.append(report.usage)
        return live

    def outstanding(self, executor_id: str) -> int:
        """Invocations live replicas routed to `executor_id` from a table and not finished yet."""
        return sum(max(0, u.outstanding.get(executor_id, 0)) for u in self._live())

    def released(self, executor_id: str, instance: str, version: int) -> bool:
        """Whether no live replica can still pick `executor_id`: each applied `version` (or later) and has none out."""
        return all(
            u.instance == instance and u.version >= version and u.outstanding.get(executor_id, 0) <= 0
            for u in self._live()
        )

    def replicas(self) -> int:
        """Live replicas (for the status)."""
        return len(self._live())
