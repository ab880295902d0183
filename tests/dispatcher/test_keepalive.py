"""A graph's keepalives: the acknowledgement waits `ack_delay_s`, so a short graph sends none.

Real nats-server; `Keepalive` publishes on a subject this test subscribes to, as the gateway's
graph inbox does.
"""

from __future__ import annotations

import asyncio

import nats
from nats.aio.client import Client

from cornserve.bus.control import InvokeKeepalive
from cornserve.dispatcher.keepalive import Keepalive

DEADLINE_S = 10.0


async def watch(nc: Client, subject: str) -> asyncio.Queue[InvokeKeepalive]:
    """Every keepalive published on `subject`, parsed, in order."""
    seen: asyncio.Queue[InvokeKeepalive] = asyncio.Queue()

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        seen.put_nowait(InvokeKeepalive.model_validate_json(msg.data))

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    return seen


async def test_a_graph_released_before_the_ack_delay_sends_no_keepalive(nc: Client) -> None:
    seen = await watch(nc, "test.short.alive")
    keepalive = Keepalive(nc, "test.short.alive", "req-short", "replica-a", 0.2, ack_delay_s=0.1)
    await keepalive.start()
    keepalive.release()  # the graph replied at once
    assert keepalive.stopped
    await asyncio.sleep(0.5)  # past the delay and two intervals
    await nc.flush()
    assert seen.empty(), seen.get_nowait()


async def test_a_longer_graph_is_acknowledged_then_kept_alive(nc: Client) -> None:
    seen = await watch(nc, "test.long.alive")
    keepalive = Keepalive(nc, "test.long.alive", "req-long", "replica-b", 0.2, ack_delay_s=0.05)
    await keepalive.start()
    try:
        async with asyncio.timeout(DEADLINE_S):
            first, second = await seen.get(), await seen.get()
    finally:
        keepalive.release()
    assert (first.seq, first.replica_id, first.request_id) == (0, "replica-b", "req-long")
    assert (second.seq, second.replica_id) == (1, "replica-b")


async def test_a_zero_ack_delay_acknowledges_at_once(nc: Client) -> None:
    seen = await watch(nc, "test.now.alive")
    keepalive = Keepalive(nc, "test.now.alive", "req-now", "replica-c", 60.0, ack_delay_s=0.0)
    await keepalive.start()
    keepalive.release()  # released at once: the acknowledgement was already sent
    async with asyncio.timeout(DEADLINE_S):
        ack = await seen.get()
    assert (ack.seq, ack.replica_id) == (0, "replica-c")


async def test_the_ack_delay_is_capped_at_the_interval(nc: Client) -> None:
    seen = await watch(nc, "test.capped.alive")
    # An hour's delay, but the caller asked for a keepalive every 0.1 s: the ack comes after 0.1 s.
    keepalive = Keepalive(nc, "test.capped.alive", "req-capped", "replica-d", 0.1, ack_delay_s=3600.0)
    await keepalive.start()
    try:
        async with asyncio.timeout(DEADLINE_S):
            ack = await seen.get()
    finally:
        keepalive.release()
    assert ack.seq == 0
