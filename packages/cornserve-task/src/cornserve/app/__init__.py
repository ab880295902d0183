"""The app API: an app is a Python file with a `Config(AppConfig)` naming its tasks and an `async def serve`.

See docs/tasks.md for the contract and `examples/mllm_app.py` for an example.
"""

from cornserve.app.config import AppConfig
from cornserve.app.errors import AppValidationError
from cornserve.app.loader import AppSpec, load_app, validate_app
from cornserve.app.trace import trace_app

__all__ = ["AppConfig", "AppSpec", "AppValidationError", "load_app", "trace_app", "validate_app"]
