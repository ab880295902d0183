"""`python -m cornserve.executor`: the command line of a Python task executor process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cornserve.executor.server import ExecutorServer, StartupError
from cornserve.executor.settings import PythonExecutorSettings
from cornserve.runtime.service import run_executor


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m cornserve.executor`: port first, then the task; 1 if it cannot start."""
    sys.exit(run_executor(PythonExecutorSettings, ExecutorServer, argv=argv, expected_errors=(StartupError,)))
