"""Fault handling: unreachable ranks, missing data, restarts, malformed messages."""

import json

import nats
import pytest
import torch
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from tests.support.waiting import wait_for

from cornserve.bus.micro import request
from cornserve.bus.sidecar import InfoReply, InfoRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.sidecar import Sidecar
from cornserve.sidecar.errors import DataLost, DestinationUnreachable, RecvTimeout, SidecarUnavailable


async def test_unreachable_destination_fails_naming_the_rank(sidecars, nats_url, stats_of):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url, timeout=120) as src:
        with pytest.raises(DestinationUnreachable, match="rank 9999") as info:
            await src.send(torch.ones(100), "u", [[b.rank], [9999]])
        assert info.value.details["rank"] == 9999
    # Nothing was delivered and nothing is held.
    stats = await stats_of([a.rank, b.rank])
    assert stats[a.rank].used_bytes == 0 and stats[b.rank].mailbox_entries == 0


async def test_recv_timeout_names_the_id(sidecars, nats_url):
    (a,) = await sidecars(1)
    async with Sidecar(a.rank, nats_url) as c:
        with pytest.raises(RecvTimeout, match="never-sent") as info:
            await c.recv("never-sent", chunk_id=2, timeout=0.3)
        assert info.value.details["id"] == "never-sent"


async def test_client_without_server_gets_unavailable(nats_url):
    c = Sidecar(424242, nats_url)
    with pytest.raises(SidecarUnavailable, match="424242"):
        await c.connect()
    await c.close()


async def test_source_restart_reports_lost_and_clients_reconnect(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await src.send(torch.ones(1000), "held", [[b.rank]])
        old = (await src.info()).instance
        a.kill()  # SIGKILL: the data it held in its arena is gone
        a.restart()
        await a.wait_ready(not_instance=old)
        await wait_for(lambda: _lost(stats_of, b.rank), 20.0, "the data marked lost", interval=0.05)
        with pytest.raises(DataLost, match=f"rank {a.rank} restarted"):
            await dst.recv("held", timeout=5)
        # The same client keeps working against the new instance.
        await src.send(torch.full((10,), 7.0), "after", [[b.rank]])
        assert torch.equal(await dst.recv("after", timeout=5), torch.full((10,), 7.0))
        await dst.mark_done("after")
        assert (await src.info()).instance != old
    await arenas_empty([a.rank, b.rank])


async def test_destination_restart_reports_lost_and_frees_source(sidecars, nats_url, stats_of, arenas_empty):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        await src.send(torch.ones(1000), "pending", [[b.rank]])
        old = (await dst.info()).instance
        b.kill()
        b.restart()
        await b.wait_ready(not_instance=old)
        with pytest.raises(DataLost, match="restarted"):
            await _recv_until_lost(dst, "pending")
    await arenas_empty([a.rank, b.rank])


async def _recv_until_lost(dst, id_):
    # The source learns of the restart from the up event and notifies the new instance; until then
    # the receive simply waits (it never returns stale data).
    return await dst.recv(id_, timeout=10)


async def _lost(stats_of, rank):
    return (await stats_of([rank]))[rank].lost_total > 0


BAD_PAYLOADS = [b"", b"not json", b"[]", json.dumps({"request_id": "r1", "bogus": 1}).encode()]


@pytest.mark.parametrize("verb", list(SidecarVerb))
async def test_bad_messages_get_typed_error_replies_and_server_stays_up(sidecars, nats_url, verb):
    (a,) = await sidecars(1)
    nc = await nats.connect(nats_url)
    try:
        for payload in BAD_PAYLOADS:
            if verb in (SidecarVerb.INFO, SidecarVerb.STATS) and payload == b"":
                continue  # these take an empty request
            msg = await nc.request(sidecar_subject(a.rank, verb), payload, timeout=5)
            assert msg.headers is not None and msg.headers[ERROR_CODE_HEADER] == "400", (verb, payload)
            assert msg.headers[ERROR_HEADER]
            body = json.loads(msg.data)
            assert body["error"] == "bad_request"
            if b"r1" in payload:
                assert body["request_id"] == "r1"
        info = await request(nc, sidecar_subject(a.rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 5)
        assert info.rank == a.rank
    finally:
        await nc.close()


async def test_semantic_errors_are_typed(sidecars, nats_url):
    (a,) = await sidecars(1)
    async with Sidecar(a.rank, nats_url) as c:
        from cornserve.sidecar.errors import BadRequest, NotFound, UnknownStream

        with pytest.raises(NotFound):
            await c.mark_done("nothing-here")
        with pytest.raises(UnknownStream):
            await c.close_stream("no-such-stream", 3)
        with pytest.raises(BadRequest, match="dst_ranks"):
            await c.send(torch.ones(1), "x", [])
        with pytest.raises(BadRequest):
            await c.send(torch.ones(1), "x", [[]])
        assert (await c.stats()).used_bytes == 0


async def test_garbage_on_the_tcp_port_does_not_hurt_the_server(sidecars, nats_url):
    import socket

    (a,) = await sidecars(1)
    async with Sidecar(a.rank, nats_url) as c:
        info = await c.info()
        for junk in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b""):
            with socket.create_connection((info.tcp_host, info.tcp_port)) as s:
                s.sendall(junk)
        assert (await c.stats()).used_bytes == 0
        await c.send("still fine", "ok", [[a.rank]])
        assert await c.recv("ok", timeout=5) == "still fine"
        await c.mark_done("ok")
    assert "refused TCP peer" in a.log_path.read_text()  # junk never gets past the handshake


async def test_unreachable_nats_and_closed_client_are_typed_errors(nats_url):
    from cornserve.runtime.process import free_port
    from cornserve.sidecar.errors import SidecarError

    c = Sidecar(1, f"nats://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(SidecarUnavailable, match="cannot reach NATS"):
        await c.connect()
    await c.close()
    with pytest.raises(SidecarError, match="closed"):
        await c.recv("x", timeout=1)
