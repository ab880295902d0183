"""Reading OpenAI `chat.completion.chunk`s as the CLI prints them: the text they add, the usage at the end.

The example app (and any app that speaks OpenAI chat completions) streams such chunks from its
own invoke route; `cornserve demo` and `cornserve invoke --text` print their text as it arrives.
The chunks come from the network as JSON, so nothing in them is trusted to have any shape.
"""

from __future__ import annotations

from typing import Any


def chunk_text(item: Any) -> str:
    """The text a streamed chunk adds ("" for the role, finish and usage chunks, or any other item)."""
    if not isinstance(item, dict) or not isinstance(item.get("choices"), list):
        return ""
    pieces = [
        choice["delta"].get("content")
        for choice in item["choices"]
        if isinstance(choice, dict) and isinstance(choice.get("delta"), dict)
    ]
    return "".join(p for p in pieces if isinstance(p, str))


def chunk_usage(item: Any) -> str | None:
    """`prompt N + completion M tokens` when the chunk carries the usage, else None."""
    usage = item.get("usage") if isinstance(item, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return f"prompt {prompt} + completion {completion} tokens"
