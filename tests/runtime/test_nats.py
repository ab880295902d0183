"""`connect_nats` against a real nats-server: connects, rides out a restart, and gives up in time."""

from __future__ import annotations

import logging
import time

import pytest
from tests.support.waiting import wait_for

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.nats import NatsConnectTimeout, connect_nats
from cornserve.runtime.process import free_port


async def test_connects_and_reconnects_after_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cornserve.runtime.nats")
    server = NatsServerProcess()
    server.start()
    try:
        nc = await connect_nats(server.url, name="runtime-test")
        try:
            sub = await nc.subscribe("t.x")
            await nc.publish("t.x", b"1")
            assert (await sub.next_msg(timeout=2)).data == b"1"
            server.stop()
            server.start()
            await wait_for(lambda: "reconnected" in caplog.text, 10, "the client to log its reconnect")
            assert "runtime-test: disconnected from NATS" in caplog.text
            assert "runtime-test: reconnected to NATS" in caplog.text
            await nc.publish("t.x", b"2")
            assert (await sub.next_msg(timeout=2)).data == b"2"
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_the_first_connect_has_a_deadline() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(NatsConnectTimeout, match=rf"cannot reach NATS at nats://127.0.0.1:{port} within 1 s"):
        await connect_nats(f"nats://127.0.0.1:{port}", name="nobody", first_connect_deadline_s=1.0)
    assert time.monotonic() - started < 5


async def test_closing_the_connection_is_not_reported_as_a_disconnect(
    caplog: pytest.LogCaptureFixture, nats_url: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="cornserve.runtime.nats")
    nc = await connect_nats(nats_url, name="closing-test")
    await nc.close()
    assert "closing-test: NATS connection closed" in caplog.text
    assert "closing-test: disconnected from NATS" not in caplog.text
