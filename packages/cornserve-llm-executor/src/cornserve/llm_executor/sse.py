"""The chunks of one streamed chat completion, built without a pydantic model per token.

Every content chunk of a completion differs only in its text, so the chunk's JSON is rendered once
by `ChatCompletionChunk` (the same id, created, model and shape as before) with a placeholder for
the text, split around it, and each token's chunk is the two halves joined around the text's JSON
string. Each chunk is one JSON object (UTF-8): an SSE `data:` line's payload (`sse_line`) or a
published stream message's item (`cornserve.llm_executor.publish`).
"""

from __future__ import annotations

import json

from cornserve.task.builtins.chat import ChatCompletionChunk, ChoiceDelta, ChunkChoice, Usage

_SLOT = "cornserve-content-slot"
"""Placeholder text; the last occurrence in the rendered chunk is the content's (nothing follows it but brackets)."""


def sse_line(payload: bytes) -> bytes:
    """One server-sent event carrying `payload`."""
    return b"data: " + payload + b"\n\n"


class ChunkLines:
    """Renders the chunks of the completion `id`."""

    def __init__(self, id: str, created: int, model: str) -> None:
        self._id, self._created, self._model = id, created, model
        rendered = self._chunk(choices=[ChunkChoice(delta=ChoiceDelta(content=_SLOT))])
        head, slot, tail = rendered.rpartition(json.dumps(_SLOT))
        if not slot:  # cannot happen: the placeholder is plain ASCII, rendered as is
            raise RuntimeError(f"chunk template without its content slot: {rendered}")
        self._head = head.encode()
        self._tail = tail.encode()

    def _chunk(self, **fields: object) -> str:
        chunk = ChatCompletionChunk.model_validate(
            {"id": self._id, "created": self._created, "model": self._model, **fields}
        )
        return chunk.model_dump_json(exclude_none=True)

    def role(self) -> bytes:
        """The first chunk: the assistant role with empty content."""
        return self._chunk(choices=[ChunkChoice(delta=ChoiceDelta(role="assistant", content=""))]).encode()

    def content(self, text: str) -> bytes:
        """A chunk with `text` as the delta's content."""
        return self._head + json.dumps(text, ensure_ascii=False).encode() + self._tail

    def finish(self, reason: str) -> bytes:
        """The chunk with the finish reason and an empty delta."""
        return self._chunk(choices=[ChunkChoice(delta=ChoiceDelta(), finish_reason=reason)]).encode()

    def usage(self, usage: Usage) -> bytes:
        """The usage chunk (no choices) of `stream_options.include_usage`."""
        return self._chunk(choices=[], usage=usage).encode()
