"""The relay's line splitting: lines split across reads, several lines in one read, the limit."""

from __future__ import annotations

import pytest

from cornserve.dispatcher.lines import LineSplitter, LineTooLong


def test_lines_split_across_reads_and_piled_up_in_one() -> None:
    lines = LineSplitter(max_line=100)
    assert lines.feed(b"data: {") == []
    assert lines.feed(b'"a": 1}\n\ndata: {"b"') == [b'data: {"a": 1}', b""]
    assert lines.feed(b": 2}\r\ndata: [DONE]\n") == [b'data: {"b": 2}\r', b"data: [DONE]"]
    assert lines.finish() is None


def test_a_last_line_without_a_line_end_is_kept() -> None:
    lines = LineSplitter(max_line=100)
    assert lines.feed(b'{"x": 1}\n{"y"') == [b'{"x": 1}']
    assert lines.feed(b": 2}") == []
    assert lines.finish() == b'{"y": 2}'


@pytest.mark.parametrize("chunks", [[b"x" * 11], [b"x" * 6, b"x" * 6], [b"x" * 11 + b"\nok\n"]])
def test_a_line_over_the_limit_is_refused(chunks: list[bytes]) -> None:
    lines = LineSplitter(max_line=10)
    with pytest.raises(LineTooLong, match="longer than 10 bytes"):
        for chunk in chunks:
            lines.feed(chunk)
