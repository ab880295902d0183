"""Bus events are validated, or dropped with a warning naming the subject (`cornserve.bus.events`)."""

from __future__ import annotations

import logging

import pytest
from nats.aio.msg import Msg

from cornserve.bus.control import InvokeCancel
from cornserve.bus.events import parse_event

logger = logging.getLogger("test.events")


def _msg(subject: str, data: bytes) -> Msg:
    return Msg(_client=None, subject=subject, data=data)  # type: ignore[arg-type]


def test_a_valid_event_parses() -> None:
    cancel = InvokeCancel(cancel_id="cancel-0001")
    got = parse_event(
        InvokeCancel, _msg("cornserve.dispatch.cancel", cancel.model_dump_json().encode()), logger
    )
    assert got == cancel


@pytest.mark.parametrize("data", [b"{not json", b'{"cancel_id": 5}', b"[]"])
def test_a_malformed_event_is_dropped_with_a_warning(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="test.events"):
        assert parse_event(InvokeCancel, _msg("cornserve.dispatch.cancel", data), logger) is None
    (record,) = caplog.records
    assert "malformed InvokeCancel on cornserve.dispatch.cancel dropped" in record.getMessage()
