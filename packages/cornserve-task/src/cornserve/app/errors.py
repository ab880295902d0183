"""Errors raised while loading an app."""

from __future__ import annotations


class AppValidationError(ValueError):
    """An app's source does not satisfy the app contract; the message names the problem and line."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)
