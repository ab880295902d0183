"""The task manager's Prometheus metrics: its executors by state, their in-flight work and restarts.

Read from the manager at scrape time (no bookkeeping of their own), served on the task manager's
``--metrics-port``, which the resource manager's spawner assigns when it runs with
``--task-manager-metrics`` (the port is then part of the deployment's info, so `GET /tasks` shows
where to scrape). Labels: `deployment` (the task key; one per task manager process) and `task` (the
unit task's class name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, get_args

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cornserve.bus.control import ExecutorState

if TYPE_CHECKING:
    from cornserve.task_manager.manager import TaskManager


class ExecutorCollector(Collector):
    """The watched manager's executors, read now."""

    def __init__(self) -> None:
        self.manager: TaskManager | None = None

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """The families, read now."""
        labels = ["deployment", "task"]
        by_state = GaugeMetricFamily(
            "cornserve_task_executors", "Executors of the deployment, by state.", labels=[*labels, "state"]
        )
        in_flight = GaugeMetricFamily(
            "cornserve_task_executor_in_flight",
            "Calls routed to an executor and not yet done.",
            labels=[*labels, "executor"],
        )
        routed = CounterMetricFamily(
            "cornserve_task_executor_routed", "Calls routed to an executor.", labels=[*labels, "executor"]
        )
        restarts = CounterMetricFamily(
            "cornserve_task_executor_restarts",
            "Times the task manager restarted an executor (it exited or failed its health checks).",
            labels=[*labels, "executor"],
        )
        manager = self.manager
        if manager is not None:
            base = [manager.task_key, type(manager.task).__name__]
            executors = list(manager.executors.values())  # one C-level copy: safe from the scrape thread
            for state in get_args(ExecutorState):
                by_state.add_metric([*base, state], sum(ex.state == state for ex in executors))
            for ex in executors:
                in_flight.add_metric([*base, ex.executor_id], ex.in_flight)
                routed.add_metric([*base, ex.executor_id], ex.routed)
                restarts.add_metric([*base, ex.executor_id], ex.restarts)
        return [by_state, in_flight, routed, restarts]


EXECUTORS = ExecutorCollector()
REGISTRY.register(EXECUTORS)


def watch_manager(manager: TaskManager) -> None:
    """Report `manager`'s executors."""
    EXECUTORS.manager = manager
