"""Errors the client raises."""

from __future__ import annotations

from typing import Any


class CornserveError(Exception):
    """The gateway answered with an error (or could not be reached)."""

    def __init__(self, status: int, error: str, message: str, detail: Any = None) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status = status
        self.error = error
        self.message = message
        self.detail = detail


class CornserveAuthError(CornserveError):
    """The gateway refused the token (401: none or unknown; 403: an API key on an admin route).

    The message says which token was sent (never its value) and how to supply the right one.
    """
