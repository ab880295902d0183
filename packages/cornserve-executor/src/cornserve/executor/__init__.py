"""cornserve.executor: a small framework for Python task executors.

A task library defines a unit task, a `PythonExecutorDescriptor` subclass naming a handler, and
the async handler itself. The descriptor launches `python -m cornserve.executor`, an HTTP server
that loads the library, connects a sidecar client and calls the handler for every invocation.
Only the descriptor and the context are imported here (services loading task libraries import
this package too, and must not pay for the server or the sidecar client).
"""

from importlib.metadata import version

from cornserve.executor.context import ExecutorContext, Handler, HandlerResult, NoSidecarError
from cornserve.executor.descriptor import HEALTH_PATH, INVOKE_PATH, PythonExecutorDescriptor, stream_item_type

__version__ = version("cornserve-executor")

__all__ = [
    "HEALTH_PATH",
    "INVOKE_PATH",
    "ExecutorContext",
    "Handler",
    "HandlerResult",
    "NoSidecarError",
    "PythonExecutorDescriptor",
    "__version__",
    "stream_item_type",
]
