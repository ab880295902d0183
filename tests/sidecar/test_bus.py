"""cornserve.bus helpers against the real nats-server."""

import nats
import pytest

from cornserve.bus.micro import NoResponders, RequestTimeout, request
from cornserve.bus.sidecar import InfoReply, InfoRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.cli.natsserver import NatsServerProcess, find_nats_server_binary


async def test_session_server_has_jetstream(nats_url):
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().account_info()
        assert info is not None
    finally:
        await nc.close()


def test_server_process_start_stop_cleans_store(tmp_path):
    assert find_nats_server_binary().endswith("nats-server")
    srv = NatsServerProcess()
    srv.start()
    store = srv.store_dir
    assert srv.running and store.exists()
    srv.stop()
    assert not srv.running and not store.exists()
    kept = NatsServerProcess(store_dir=tmp_path / "js")
    with kept:
        assert kept.url.startswith("nats://127.0.0.1:")
    assert (tmp_path / "js").exists()  # a caller-provided store is never deleted


async def test_no_responders_and_timeout_are_distinct(nats_url):
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(NoResponders):
            await request(nc, "cornserve.test.nobody", InfoRequest(), InfoReply, 1.0)
        await nc.subscribe("cornserve.test.silent", cb=_ignore)
        with pytest.raises(RequestTimeout):
            await request(nc, "cornserve.test.silent", InfoRequest(), InfoReply, 0.2)
    finally:
        await nc.close()


async def _ignore(msg) -> None:
    """Subscribed but never replies: the requester must see a timeout, not 'no responders'."""


def test_subjects_are_lowercase_dotted_broad_to_narrow():
    for verb in SidecarVerb:
        subject = sidecar_subject(7, verb)
        assert subject == subject.lower() and subject.split(".")[:3] == ["cornserve", "sidecar", "7"]
    with pytest.raises(ValueError):
        sidecar_subject(-1, SidecarVerb.INFO)


def test_server_that_cannot_start_reports_why():
    import socket

    from cornserve.cli.natsserver import NatsServerError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        srv = NatsServerProcess(port=busy.getsockname()[1])
        with pytest.raises(NatsServerError):
            srv.start()
        srv.stop()
