"""The wire form relays build by joining bytes is a valid StreamMessage, and keeps the items' order."""

from __future__ import annotations

import json

import pytest

from cornserve.bus.control import StreamMessage, stream_batches, stream_item_limit, stream_items_message


def test_one_item_is_sent_as_item() -> None:
    message = StreamMessage.model_validate_json(stream_items_message(3, [b'{"a":1}']))
    assert message == StreamMessage(seq=3, item={"a": 1})


def test_several_items_keep_their_order() -> None:
    raw = [json.dumps({"index": i, "text": "é\n"}).encode() for i in range(5)]
    message = StreamMessage.model_validate_json(stream_items_message(7, raw))
    assert message.seq == 7 and message.item is None and not message.end
    assert message.items == [{"index": i, "text": "é\n"} for i in range(5)]


def test_no_items_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one item"):
        stream_items_message(0, [])


def test_the_last_items_may_carry_the_end() -> None:
    one = StreamMessage.model_validate_json(stream_items_message(4, [b'{"a":1}'], end=True))
    assert one == StreamMessage(seq=4, item={"a": 1}, end=True)
    two = StreamMessage.model_validate_json(stream_items_message(5, [b'{"a":1}', b'{"b":2}'], end=True))
    assert two == StreamMessage(seq=5, items=[{"a": 1}, {"b": 2}], end=True)


def test_stream_batches_keep_the_order_and_fit_the_payload_limit() -> None:
    """Relays and publishing executors split items alike: in order, each batch within the limit, a big one alone."""
    limit = stream_item_limit(10_000)
    small = [b"x" * 1000] * 12
    batches = stream_batches(small, 10_000)
    assert [item for batch in batches for item in batch] == small
    assert (
        all(sum(len(i) + 1 for i in batch) <= limit for batch in batches) and len(batches) == 3
    )  # 5 + 5 + 2 items of 1001 bytes in 5904
    big = b"y" * (limit + 1)
    assert stream_batches([b"a", big, b"b"], 10_000) == [[b"a"], [big], [b"b"]]
    assert stream_batches([], 10_000) == []
