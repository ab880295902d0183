"""The CLI's optional part: `cornserve-cli[models]` (tiny checkpoints and the CPU executors).

The plain CLI stays torch-free, so the commands that build or serve a model check for the extra
before importing it and fail with one line that says what to install, instead of a traceback.
"""

from __future__ import annotations

import importlib.util

MODELS_EXTRA = "cornserve-cli[models]"


class MissingExtraError(RuntimeError):
    """A command needs modules of an extra that is not installed."""


def require_models_extra(command: str, modules: tuple[str, ...]) -> None:
    """Raise `MissingExtraError` naming `command` when any of `modules` is not installed."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(
            f"`cornserve {command}` needs the models extra (missing {', '.join(missing)}): "
            f"pip install '{MODELS_EXTRA}'"
        )
