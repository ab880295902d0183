"""Replies in parts (`cornserve.bus.reply_parts`): the assembler trusts nothing the headers say."""

from __future__ import annotations

import pytest

from cornserve.bus.reply_parts import (
    COUNT_HEADER,
    PART_HEADER,
    TOTAL_HEADER,
    ReplyAssembler,
    ReplyPartError,
    split_reply,
)


def test_parts_put_back_together_in_order() -> None:
    data = bytes(range(256)) * 41
    parts = split_reply(data, 1000)
    assert len(parts) == 11
    assembler = ReplyAssembler(max_bytes=len(data))
    results = [assembler.add(headers, chunk) for headers, chunk in parts]
    assert results[:-1] == [None] * 10
    assert results[-1] == data


def test_an_empty_reply_is_one_part() -> None:
    ((headers, chunk),) = split_reply(b"", 10)
    assert ReplyAssembler(10).add(headers, chunk) == b""


def test_a_reply_over_the_cap_is_refused_at_its_first_part() -> None:
    headers, chunk = split_reply(b"x" * 100, 10)[0]
    with pytest.raises(ReplyPartError, match="more than this gateway accepts") as caught:
        ReplyAssembler(max_bytes=99).add(headers, chunk)
    assert caught.value.too_large


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda parts: [parts[1], parts[0], *parts[2:]], "arrived where part 0 was due"),
        (lambda parts: [parts[0], parts[0], *parts[1:]], "arrived where part 1 was due"),
        (lambda parts: [({**parts[0][0], COUNT_HEADER: "2"}, parts[0][1]), *parts[1:]], "announces"),
        (lambda parts: [(parts[0][0], parts[0][1] + b"extra"), *parts[1:]], "more than the"),
        (lambda parts: [*parts[:-1], (parts[-1][0], parts[-1][1][:-1])], "hold 29 bytes, not 30"),
        (lambda parts: [({PART_HEADER: "0", COUNT_HEADER: "3"}, parts[0][1])], "Bytes header"),
        (lambda parts: [({**parts[0][0], TOTAL_HEADER: "many"}, parts[0][1])], "not a number"),
        (lambda parts: [({**parts[0][0], COUNT_HEADER: "0"}, parts[0][1])], "cannot have 0 parts"),
    ],
)
def test_a_part_that_does_not_fit_is_refused(mangle, match) -> None:
    parts = mangle(split_reply(b"abcdefghij" * 3, 10))
    assembler = ReplyAssembler(max_bytes=1000)
    with pytest.raises(ReplyPartError, match=match) as caught:
        for headers, chunk in parts:
            assembler.add(headers, chunk)
    assert not caught.value.too_large
