"""The chunks of a streamed completion say what `ChatCompletionChunk` says, for any text and model name."""

from __future__ import annotations

import json

import pytest

from cornserve.llm_executor.sse import ChunkLines, sse_line
from cornserve.task.builtins.chat import ChatCompletionChunk, ChoiceDelta, ChunkChoice, Usage

TEXTS = [
    "plain",
    "",
    'quote " and backslash \\',
    "new\nline\ttab\r\x00\x1f\x7f",
    "unicode é 你好 \u2028 \U0001f600",
    "cornserve-content-slot",
    '"cornserve-content-slot"',
]


def _payload(chunk: bytes) -> object:
    assert b"\n" not in chunk, chunk  # one line: an SSE data line's payload or a stream message's item
    return json.loads(chunk.decode())


def _expected(model: str, **fields: object) -> object:
    chunk = ChatCompletionChunk.model_validate({"id": "chatcmpl-1", "created": 7, "model": model, **fields})
    return json.loads(chunk.model_dump_json(exclude_none=True))


@pytest.mark.parametrize("model", ["tiny", 'odd "cornserve-content-slot" model', "cornserve-content-slot"])
def test_content_lines_match_the_chunk_model(model: str) -> None:
    lines = ChunkLines("chatcmpl-1", 7, model)
    for text in TEXTS:
        assert _payload(lines.content(text)) == _expected(
            model, choices=[ChunkChoice(delta=ChoiceDelta(content=text))]
        ), text


def test_role_finish_usage_and_done_lines() -> None:
    lines = ChunkLines("chatcmpl-1", 7, "tiny")
    assert _payload(lines.role()) == _expected(
        "tiny", choices=[ChunkChoice(delta=ChoiceDelta(role="assistant", content=""))]
    )
    assert _payload(lines.finish("length")) == _expected(
        "tiny", choices=[ChunkChoice(delta=ChoiceDelta(), finish_reason="length")]
    )
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert _payload(lines.usage(usage)) == _expected("tiny", choices=[], usage=usage)
    assert sse_line(b"[DONE]") == b"data: [DONE]\n\n"
