"""Cornserve's task dispatcher: executes recorded task graphs on executors.

Each replica serves `cornserve.dispatch.invoke` in one NATS queue group, so any replica can take
any graph. A graph's unit tasks are resolved to executors through their task managers, every
DataForward is wired to the chosen executors' sidecar ranks, and the executor requests run
concurrently over HTTP; outputs (or the final stream, relayed over NATS) go back to the caller.
"""

from importlib.metadata import version

__version__ = version("cornserve-dispatcher")
