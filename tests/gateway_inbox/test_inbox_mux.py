"""The gateway's one inbox subscription (`InboxMux`) on a real nats-server: routing, deadlines, bounds.

Every graph attempt reads its own box; these pin what a subscription per attempt guaranteed: only
its own prefix's messages reach a box, in order; a closed box drops what comes later; a box
holds at most its pending-bytes bound; a box that gets nothing times out as `next_msg` did.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest

from cornserve.gateway.inbox_mux import InboxMux

DEADLINE = 30.0
"""Upper bound on waiting for a message that was sent (a loaded 2-core machine)."""


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


async def test_each_box_gets_its_own_prefix_in_order(nc: nats.NATS) -> None:
    mux = InboxMux(nc)
    one, two = await mux.open(1 << 20), await mux.open(1 << 20)
    assert one.prefix != two.prefix and one.prefix.startswith("_INBOX.")
    for i in range(3):
        await nc.publish(f"{one.prefix}.reply", f"one-{i}".encode())
        await nc.publish(f"{two.prefix}.alive", f"two-{i}".encode())
    got_one = [(await one.next_msg(DEADLINE)) for _ in range(3)]
    got_two = [(await two.next_msg(DEADLINE)) for _ in range(3)]
    assert [m.data for m in got_one] == [b"one-0", b"one-1", b"one-2"]
    assert {m.subject for m in got_one} == {f"{one.prefix}.reply"}
    assert [m.data for m in got_two] == [b"two-0", b"two-1", b"two-2"]
    assert one.pending_msgs == two.pending_msgs == 0
    await mux.close()


async def test_a_closed_box_drops_later_messages_and_others_still_get_theirs(nc: nats.NATS) -> None:
    mux = InboxMux(nc)
    closed, open_ = await mux.open(1 << 20), await mux.open(1 << 20)
    await closed.unsubscribe()
    await closed.unsubscribe()  # idempotent
    await nc.publish(f"{closed.prefix}.reply", b"late")
    await nc.publish(f"{open_.prefix}.reply", b"mine")
    assert (await open_.next_msg(DEADLINE)).data == b"mine"
    assert closed.pending_msgs == 0
    with pytest.raises(nats.errors.ConnectionClosedError):
        await closed.next_msg(0.1)
    await mux.close()


async def test_nothing_within_the_timeout_is_a_timeout_and_a_waiter_wakes_on_close(nc: nats.NATS) -> None:
    mux = InboxMux(nc)
    box = await mux.open(1 << 20)
    with pytest.raises(nats.errors.TimeoutError):
        await box.next_msg(0.05)
    waiting = asyncio.create_task(box.next_msg(DEADLINE))
    await asyncio.sleep(0.01)
    await box.unsubscribe()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await asyncio.wait_for(waiting, DEADLINE)
    await mux.close()


async def test_a_box_beyond_its_pending_bytes_drops_and_recovers_once_read(nc: nats.NATS) -> None:
    mux = InboxMux(nc)
    box = await mux.open(2500)
    for i in range(3):  # 1000 + 1000 fit; the third would reach the bound and is dropped
        await nc.publish(f"{box.prefix}.stream", bytes([i]) * 1000)
    await nc.flush()
    async with asyncio.timeout(DEADLINE):
        while box.pending_msgs < 2:
            await asyncio.sleep(0.01)
    await nc.flush()
    await asyncio.sleep(0.1)  # the third, had it been kept, would be here by now
    assert box.pending_msgs == 2
    assert (await box.next_msg(DEADLINE)).data[:1] == b"\x00"
    assert (await box.next_msg(DEADLINE)).data[:1] == b"\x01"
    await nc.publish(f"{box.prefix}.stream", b"after")
    assert (await box.next_msg(DEADLINE)).data == b"after"
    await mux.close()


async def test_a_cancelled_reader_loses_no_message(nc: nats.NATS) -> None:
    mux = InboxMux(nc)
    box = await mux.open(1 << 20)
    reader = asyncio.create_task(box.next_msg(DEADLINE))
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await nc.publish(f"{box.prefix}.reply", b"kept")
    assert (await box.next_msg(DEADLINE)).data == b"kept"
    await mux.close()
