"""`python -m cornserve.llm_executor`: open the port, load the model, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import os
import sys

# Before torch loads OpenMP: idle intra-op threads sleep instead of spinning. The model thread runs
# its steps while the event loop's thread works; spinning OpenMP threads took the cores both need,
# and a step loop with 2 torch threads on 2 cores ran ten times slower (docs/performance.md,
# "LLM executor step loop in its own thread"). An operator's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from collections.abc import Sequence

from cornserve.llm_executor.config import LLMExecutorSettings
from cornserve.llm_executor.executor import LLMExecutor
from cornserve.runtime.service import run_executor


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: port first (health 503 while loading), then the model; 1 if it cannot start."""
    sys.exit(run_executor(LLMExecutorSettings, LLMExecutor, argv=argv))


if __name__ == "__main__":
    main()
