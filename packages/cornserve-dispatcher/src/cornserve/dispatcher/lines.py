"""Splitting an executor's streamed response, read in whatever pieces arrived, into lines.

The relay reads everything the executor has sent so far in one read (not one line per read): when
it fell behind, the lines that piled up come in together and leave as one bus message; when it
keeps up, each read holds one line. A line longer than `max_line` bytes is refused before it is
buffered further (it could not be published anyway).
"""

from __future__ import annotations


class LineTooLong(Exception):
    """A line (or an unfinished one) is longer than the limit."""


class LineSplitter:
    """Feed it chunks; it returns the complete lines (without their line end) and keeps the unfinished rest."""

    def __init__(self, max_line: int) -> None:
        self._max_line = max_line
        self._rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes, in order."""
        data = self._rest + chunk if self._rest else chunk
        lines = data.split(b"\n")
        self._rest = lines.pop()
        if len(self._rest) > self._max_line or any(len(line) > self._max_line for line in lines):
            raise LineTooLong(f"a line is longer than {self._max_line} bytes")
        return lines

    def finish(self) -> bytes | None:
        """At the end of the response: its last line if it had no line end, else None."""
        rest, self._rest = self._rest, b""
        return rest or None
