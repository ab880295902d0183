"""The invocation channel's frame codec: frames split anywhere, limits checked before buffering."""

from __future__ import annotations

import pytest

from cornserve.bus import invoke_channel as wire


def test_frames_split_at_every_byte_come_out_whole_and_in_order() -> None:
    meta = wire.call_meta("/invoke", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    stream = (
        wire.encode(wire.CALL, 1, meta, b'{"task": {}}')
        + wire.encode(wire.CANCEL, 1)
        + wire.encode(wire.REPLY, 2, wire.reply_meta(429, "1"), b'{"error": "busy"}')
    )
    reader = wire.FrameReader()
    frames = [frame for i in range(len(stream)) for frame in reader.feed(stream[i : i + 1])]
    assert [(f.kind, f.request_id, f.body) for f in frames] == [
        (wire.CALL, 1, b'{"task": {}}'),
        (wire.CANCEL, 1, b""),
        (wire.REPLY, 2, b'{"error": "busy"}'),
    ]
    assert wire.parse_call(frames[0]).trace["traceparent"].startswith("00-1111")
    assert wire.parse_reply(frames[2]) == wire.ReplyMeta(status=429, retry_after="1")
    assert wire.parse_reply(wire.FrameReader().feed(wire.encode(wire.REPLY, 3))[0]).status == 200


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            wire.FRAME_HEAD.pack(1 << 20, wire.CALL, 1, 0),
            "outside this side's limits",
        ),  # head alone is enough
        (wire.FRAME_HEAD.pack(3, wire.CALL, 1, 0), "outside this side's limits"),
        (wire.encode(7, 1), "unknown kind 7"),
        (wire.FRAME_HEAD.pack(wire.REST_HEAD_BYTES + 2, wire.CALL, 1, 3) + b"abc", "meta length of 3"),
        (wire.FRAME_HEAD.pack(100, wire.CALL, 1, wire.MAX_META_BYTES + 1), "meta length"),
    ],
)
def test_a_malformed_frame_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(wire.FrameError, match=reason):
        wire.FrameReader(max_frame_bytes=64 << 10).feed(data)


def test_invalid_meta_is_refused_by_its_model() -> None:
    (frame,) = wire.FrameReader().feed(wire.encode(wire.REPLY, 1, b'{"status": 700}'))
    with pytest.raises(wire.FrameError, match="invalid ReplyMeta"):
        wire.parse_reply(frame)
    (frame,) = wire.FrameReader().feed(wire.encode(wire.CALL, 1, b'{"path": "/invoke", "extra": 1}'))
    with pytest.raises(wire.FrameError, match="invalid CallMeta"):
        wire.parse_call(frame)
