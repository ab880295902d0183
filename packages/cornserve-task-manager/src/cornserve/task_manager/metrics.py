"""The task manager's Prometheus metrics: its executors by state, their in-flight work and restarts.

Read from the manager at scrape time (no bookkeeping of their own), served on the task manager's
``--metrics-port``, which the resource manager's spawner assigns when it runs with
``--task-manager-metrics`` (the port is then part of the deployment's info, so `GET /tasks` shows
where to scrape). Labels: `deployment` (the task key; one per task manager process) and `task` (the
unit task's class name). The executors are read on the task manager's event loop
(`cornserve.runtime.metrics.read_on_loop`), as every collector that reads loop-owned state does: the
scrape thread never iterates the manager's dict itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cornserve.bus.control import ExecutorState
from cornserve.runtime.metrics import read_on_loop

if TYPE_CHECKING:
    from cornserve.task_manager.manager import TaskManager


@dataclass(frozen=True)
class ExecutorFigures:
    """One executor's figures, copied on the event loop."""

    executor_id: str
    state: ExecutorState
    in_flight: int
    routed: int
    restarts: int


@dataclass(frozen=True)
class ManagerFigures:
    """The manager's executors at one scrape, copied on the event loop."""

    task_key: str
    task: str
    """The unit task's class name."""
    executors: list[ExecutorFigures]


def figures_of(manager: TaskManager) -> ManagerFigures:
    """Copy what the collector reports (call it on the manager's loop)."""
    return ManagerFigures(
        task_key=manager.task_key,
        task=type(manager.task).__name__,
        executors=[
            ExecutorFigures(ex.executor_id, ex.state, manager.in_flight(ex), ex.routed, ex.restarts)
            for ex in manager.executors.values()
        ],
    )


class ExecutorCollector(Collector):
    """The watched manager's executors, read now."""

    def __init__(self) -> None:
        self.source: Callable[[], ManagerFigures] | None = None

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
        if self.source is not None:
            figures = self.source()
            base = [figures.task_key, figures.task]
            for state in get_args(ExecutorState):
                by_state.add_metric([*base, state], sum(ex.state == state for ex in figures.executors))
            for ex in figures.executors:
                in_flight.add_metric([*base, ex.executor_id], ex.in_flight)
                routed.add_metric([*base, ex.executor_id], ex.routed)
                restarts.add_metric([*base, ex.executor_id], ex.restarts)
        return [by_state, in_flight, routed, restarts]


EXECUTORS = ExecutorCollector()
REGISTRY.register(EXECUTORS)


def watch_manager(manager: TaskManager) -> None:
    """Report `manager`'s executors (called on its event loop, which then serves every read)."""
    EXECUTORS.source = read_on_loop(lambda: figures_of(manager))
