"""Python client of a Cornserve cluster, over the gateway's HTTP API.

`CornserveClient` manages apps, tasks and task libraries (the CLI uses it). `connect()` opens a
notebook/SDK session: deploy tasks, then `await task(input)` runs them on the cluster; closing the
session (or missing heartbeats) releases them.
"""

from cornserve.client.auth import resolve_token
from cornserve.client.errors import CornserveAuthError, CornserveError
from cornserve.client.http import CornserveClient, default_url
from cornserve.client.session import ClusterSession, connect

__all__ = [
    "ClusterSession",
    "CornserveAuthError",
    "CornserveClient",
    "CornserveError",
    "connect",
    "default_url",
    "resolve_token",
]
