"""`python -m cornserve.eric`: the command line `EricDescriptor.launch_spec` writes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cornserve.eric.server import EricServer, StartupError
from cornserve.eric.settings import EricSettings
from cornserve.runtime.service import run_executor


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m cornserve.eric`: port first, then the model; 1 if it cannot start."""
    sys.exit(run_executor(EricSettings, EricServer, argv=argv, expected_errors=(StartupError,)))
