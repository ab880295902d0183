"""The one error-reply codec (`cornserve.bus.error_codec`): what services send is what clients read."""

from __future__ import annotations

import nats
import pytest
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from cornserve.bus.control import AckReply, ShutdownRequest
from cornserve.bus.error_codec import decode_error, encode_error, publish_error
from cornserve.bus.micro import ServiceErrorReply, request
from cornserve.bus.schemas import ErrorReply


def test_encoded_error_decodes_to_the_same_reply() -> None:
    headers, body = encode_error("r1", 409, "not_ready", "task x is deploying:\r\nwait", {"task": "x"})
    assert headers == {ERROR_HEADER: "task x is deploying:  wait", ERROR_CODE_HEADER: "409"}
    decoded = decode_error(headers, body)
    assert decoded is not None and decoded.code == "409" and decoded.status == 409
    assert decoded.reply == ErrorReply(
        request_id="r1", error="not_ready", message="task x is deploying:\r\nwait", details={"task": "x"}
    )


def test_a_success_reply_is_no_error() -> None:
    assert decode_error(None, b"{}") is None
    assert decode_error({"Other": "1"}, b"{}") is None


def test_a_foreign_error_reply_still_decodes() -> None:
    decoded = decode_error({ERROR_HEADER: "boom", ERROR_CODE_HEADER: "E42"}, b"not json")
    assert decoded is not None and decoded.status == 502
    assert decoded.reply == ErrorReply(request_id="", error="unknown", message="boom")


async def test_an_error_published_to_a_reply_subject_reaches_the_requester(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:

        async def answer(msg: Msg) -> None:
            await publish_error(nc, msg.reply, "r2", 400, "bad_request", "no", field="x")

        sub = await nc.subscribe("test.error-codec", cb=answer)
        with pytest.raises(ServiceErrorReply) as info:
            await request(nc, "test.error-codec", ShutdownRequest(request_id="r2"), AckReply, 5)
        assert info.value.code == "400"
        assert info.value.error == ErrorReply(
            request_id="r2", error="bad_request", message="no", details={"field": "x"}
        )
        await sub.unsubscribe()
    finally:
        await nc.close()
