"""Cornserve's gateway: the only user-facing HTTP server (apps, invocations, tasks, sessions)."""

__version__ = "0.1.0"
