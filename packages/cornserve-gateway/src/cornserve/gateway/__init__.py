"""Cornserve's gateway: the only user-facing HTTP server (apps, invocations, tasks, sessions)."""

from importlib.metadata import version

__version__ = version("cornserve-gateway")
