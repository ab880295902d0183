"""cornserve.task_manager: one process per deployed unit task; runs, health-checks and routes to its executors."""

from importlib.metadata import version

__version__ = version("cornserve-task-manager")
