"""cornserve.task_manager: one process per deployed unit task; runs, health-checks and routes to its executors."""

__version__ = "0.1.0"
