"""Printing an app's answer: one JSON object per line through a pipe, streamed text on a terminal.

Through a pipe every response object (or streamed item) is one JSON line, as the gateway sent it,
so scripts parse it with `json.loads` per line. On a terminal, items that carry text — the
example app's ``{"text": ...}`` and OpenAI chat completion chunks (``choices[0].delta.content``) —
are written as they arrive, so the answer appears token by token, followed by its timing; other
objects are pretty-printed JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from rich.console import Console

from cornserve.cli import console
from cornserve.cli.chat import chunk_text, chunk_usage


def text_of(item: Any) -> str | None:
    """The text an item carries, or None when it is not a text chunk.

    Every OpenAI chat completion chunk belongs to the text stream, also the role-only first one
    and the usage-only last one (their text is ""; the usage is shown after the answer).
    """
    if not isinstance(item, dict):
        return None
    if item.get("object") == "chat.completion.chunk":
        return chunk_text(item)
    text = item.get("text")
    if isinstance(text, str):
        return text
    choices = item.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")  # a whole chat completion
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
    return None


async def show_answer(items: AsyncIterator[Any]) -> int:
    """Print every item; returns how many arrived."""
    if not console.fancy():
        count = 0
        async for item in items:
            print(json.dumps(item), flush=True)
            count += 1
        return count
    out = console.stdout()
    sent = time.monotonic()
    try:
        count, first, usage = await _stream_to(out, items)
    finally:
        out.file.flush()
    if count > 1 and first is not None:
        out.print(
            f"[dim]{count} chunks; first after {(first - sent) * 1000:.0f} ms; "
            f"total {time.monotonic() - sent:.2f} s{'; ' + usage if usage else ''}[/]"
        )
    return count


async def _stream_to(out: Console, items: AsyncIterator[Any]) -> tuple[int, float | None, str | None]:
    """Write items as they come; an unfinished text line is ended even when the stream fails."""
    first: float | None = None
    count = 0
    in_text = False
    usage = None
    try:
        async for item in items:
            first = time.monotonic() if first is None else first
            count += 1
            usage = chunk_usage(item) or usage
            text = text_of(item)
            if text is not None:
                out.file.write(console.printable(text))
                out.file.flush()
                in_text = True
                continue
            if in_text:
                out.file.write("\n")
                in_text = False
            out.print_json(json.dumps(item))
    finally:
        if in_text:
            out.file.write("\n")
    return count, first, usage
