"""`python -m cornserve.llm_executor`: open the port, load the model, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cornserve.llm_executor.config import LLMExecutorSettings
from cornserve.llm_executor.executor import LLMExecutor
from cornserve.runtime.service import run_executor


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: port first (health 503 while loading), then the model; 1 if it cannot start."""
    sys.exit(run_executor(LLMExecutorSettings, LLMExecutor, argv=argv))


if __name__ == "__main__":
    main()
