"""Python client of a Cornserve cluster, over the gateway's HTTP API.

`CornserveClient` manages apps, tasks and task libraries (the CLI uses it). `connect()` opens a
notebook/SDK session: deploy tasks, then `await task(input)` runs them on the cluster; closing the
session (or missing heartbeats) releases them.
"""

from cornserve.client.errors import CornserveError
from cornserve.client.http import CornserveClient, default_url
from cornserve.client.session import ClusterSession, connect

__all__ = ["ClusterSession", "CornserveClient", "CornserveError", "connect", "default_url"]
