"""NATS authentication and per-role permissions, on a real nats-server with the config `cornserve up` writes.

The attack these close: an anonymous client on the cluster's NATS URL answered `$SRV.PING`, listed
the apps bucket, wrote the task-library bucket (which every service executes) and published
`cornserve.tm.<key>.shutdown`. Each denial is shown next to an allowed twin, so a test fails when
the permission it checks is missing, not merely when the connection is broken.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats.errors
import nkeys
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from tests.control.support import admin_nats
from tests.support.waiting import wait_for

from cornserve.bus.control import KV_APPS, KV_DEPLOYMENTS, KV_TASKLIBS, tm_subject
from cornserve.bus.kv import open_bucket
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.cli.launcher import LocalCluster
from cornserve.cli.natsauth import (
    ADMIN,
    DISPATCHER,
    EXECUTOR,
    GATEWAY,
    RESOURCE_MANAGER,
    ROLES,
    SIDECAR,
    TASK_MANAGER,
    NatsAuth,
    create_buckets,
)
from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.nats import NatsAuthError, connect_nats
from cornserve.runtime.natscreds import NatsCredentialsError, RoleCredentials, role_file_text
from cornserve.runtime.secrets import write_secret_file

DEADLINE = 10.0

ConnectAs = Callable[[str], Awaitable[Client]]


@pytest.fixture(scope="module")
def auth_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServerProcess, NatsAuth]]:
    """A nats-server with the generated per-role users (as `cornserve up` starts it), buckets created."""
    base = tmp_path_factory.mktemp("nats-auth")
    auth = NatsAuth.generate(base / "auth")
    with NatsServerProcess(store_dir=base / "store", config_file=auth.server_config) as server:
        create_buckets(server.url, auth.creds(ADMIN))
        yield server, auth


@pytest.fixture
async def connect(auth_nats: tuple[NatsServerProcess, NatsAuth]) -> AsyncIterator[ConnectAs]:
    """`await connect(role)`: a connection with that role's credentials, closed after the test."""
    server, auth = auth_nats
    opened: list[Client] = []

    async def as_role(role: str) -> Client:
        nc = await connect_nats(server.url, name=f"test-{role}", creds=auth.creds(role))
        opened.append(nc)
        return nc

    yield as_role
    for nc in opened:
        await nc.close()


DENIED_WAIT_S = 0.5
"""How long a denied JetStream request waits for the answer that never comes. Short: what proves
the denial is the server's permissions violation (`violation`), not the timeout; an allowed request
would be answered well within it, or fail the violation check if it were slower."""


async def violation(nc: Client, text: str) -> str:
    """The permissions violation the server reported to `nc` (it arrives as an async error)."""

    def reported() -> str | None:
        error = str(nc.last_error or "").lower()  # the server reports subjects in lower case
        return error if "permissions violation" in error and text.lower() in error else None

    result: str = await wait_for(reported, DEADLINE, f"a permissions violation for {text} on {nc}")
    return result


def test_generated_files_are_owner_only(auth_nats: tuple[NatsServerProcess, NatsAuth]) -> None:
    _, auth = auth_nats
    for path in [auth.server_config, *(auth.creds(role) for role in ROLES)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(auth.directory.stat().st_mode) == 0o700


async def test_anonymous_connect_is_refused_at_once(auth_nats: tuple[NatsServerProcess, NatsAuth]) -> None:
    server, _ = auth_nats
    with pytest.raises(NatsAuthError, match="refused the connection with no credentials"):
        await connect_nats(server.url, name="anonymous", first_connect_deadline_s=DEADLINE)


async def test_wrong_password_is_refused_naming_the_file(
    auth_nats: tuple[NatsServerProcess, NatsAuth], tmp_path: Path
) -> None:
    server, auth = auth_nats
    real = RoleCredentials.model_validate_json(auth.creds(GATEWAY).read_text())
    forged = write_secret_file(
        tmp_path / "forged.json", role_file_text(real.model_copy(update={"password": "x" * 43}))
    )
    with pytest.raises(NatsAuthError, match=str(forged)):
        await connect_nats(server.url, name="forged", creds=forged, first_connect_deadline_s=DEADLINE)


async def test_a_credentials_file_others_can_read_is_not_used(
    auth_nats: tuple[NatsServerProcess, NatsAuth], tmp_path: Path
) -> None:
    server, auth = auth_nats
    leaked = tmp_path / "leaked.json"
    leaked.write_text(auth.creds(GATEWAY).read_text())
    leaked.chmod(0o644)
    with pytest.raises(NatsCredentialsError, match="chmod 600"):
        await connect_nats(server.url, name="leaked", creds=leaked)


async def test_gateway_cannot_shut_a_task_manager_down(connect: ConnectAs) -> None:
    tm = await connect(TASK_MANAGER)
    received: list[Msg] = []
    got_one = asyncio.Event()

    async def on_shutdown(msg: Msg) -> None:
        received.append(msg)
        got_one.set()

    await tm.subscribe(tm_subject("victim", "shutdown"), cb=on_shutdown)
    await tm.flush()
    gateway = await connect(GATEWAY)
    await gateway.publish(tm_subject("victim", "shutdown"), b"from the gateway")
    await gateway.flush()
    assert "cornserve.tm.victim.shutdown" in await violation(gateway, "cornserve.tm.victim.shutdown")
    # The resource manager may; its message is the only one the task manager sees.
    rm = await connect(RESOURCE_MANAGER)
    await rm.publish(tm_subject("victim", "shutdown"), b"from the resource manager")
    await rm.flush()
    async with asyncio.timeout(DEADLINE):
        await got_one.wait()
    await tm.flush()
    assert [m.data for m in received] == [b"from the resource manager"]


@pytest.mark.parametrize("role", [DISPATCHER, EXECUTOR, RESOURCE_MANAGER, TASK_MANAGER, SIDECAR])
@pytest.mark.parametrize("bucket", [KV_TASKLIBS, KV_APPS])
async def test_only_the_gateway_writes_apps_and_task_libraries(
    connect: ConnectAs, role: str, bucket: str
) -> None:
    gateway = await connect(GATEWAY)
    await (await open_bucket(gateway, bucket)).put("lib", b"from the gateway")
    other = await connect(role)
    js = other.jetstream(timeout=DENIED_WAIT_S)
    with pytest.raises(nats.errors.TimeoutError):  # the server drops it: no ack comes (a timeout)
        await js.publish(f"$KV.{bucket}.lib", b"evil")
    await violation(other, f"$kv.{bucket}.lib".lower())
    kv = await open_bucket(gateway, bucket)
    assert (await kv.get("lib")).value == b"from the gateway"


async def test_executors_read_task_libraries_but_touch_no_other_bucket(connect: ConnectAs) -> None:
    gateway = await connect(GATEWAY)
    await (await open_bucket(gateway, KV_TASKLIBS)).put("readable", b"library source")
    await (await open_bucket(gateway, KV_APPS)).put("secret-app", b"app source")
    executor = await connect(EXECUTOR)
    tasklibs = await open_bucket(executor, KV_TASKLIBS)
    assert (await tasklibs.get("readable")).value == b"library source"
    assert "readable" in await tasklibs.keys()
    for bucket in (KV_APPS, KV_DEPLOYMENTS):
        with pytest.raises(nats.errors.TimeoutError):  # denied: no answer (a timeout)
            await executor.jetstream(timeout=DENIED_WAIT_S).key_value(bucket)
        await violation(executor, f"kv_{bucket}")


async def test_no_role_can_create_a_stream_capturing_control_subjects(connect: ConnectAs) -> None:
    for role in (EXECUTOR, DISPATCHER, GATEWAY):
        nc = await connect(role)
        with pytest.raises(nats.errors.TimeoutError):  # denied: no answer (a timeout)
            await nc.jetstream(timeout=DENIED_WAIT_S).add_stream(
                StreamConfig(name="sniff", subjects=["cornserve.>"])
            )
        await violation(nc, "$js.api.stream.create.sniff")


async def test_executors_cannot_publish_control_subjects(connect: ConnectAs) -> None:
    for subject in ("cornserve.rm.deploy", "cornserve.dispatch.invoke", "cornserve.tm.x.assign"):
        executor = await connect(EXECUTOR)
        await executor.publish(subject, b"{}")
        await executor.flush()
        await violation(executor, subject)


async def test_executors_publish_on_a_graph_inbox_stream_subject_and_nothing_else_there(
    connect: ConnectAs,
) -> None:
    """A stream the dispatcher lets an executor publish (STREAM_SUBJECT_HEADER) reaches the gateway; a reply does not."""
    gateway = await connect(GATEWAY)
    inbox = gateway.new_inbox()
    sub = await gateway.subscribe(f"{inbox}.>")
    await gateway.flush()
    executor = await connect(EXECUTOR)
    for subject in (f"{inbox}.stream", f"{inbox}.0a1b.stream"):  # a plain inbox and a gateway mux box
        await executor.publish(subject, b'{"seq":0,"end":true}')
        msg = await sub.next_msg(timeout=DEADLINE)
        assert (msg.subject, msg.data) == (subject, b'{"seq":0,"end":true}')
    for subject in (f"{inbox}.reply", f"{inbox}.0a1b.reply", f"{inbox}.alive"):
        await executor.publish(subject, b"{}")
        await executor.flush()
        await violation(executor, subject)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.5)


async def test_nobody_reads_another_roles_inbox(connect: ConnectAs) -> None:
    dispatcher = await connect(DISPATCHER)
    received: list[str] = []

    async def sniff(msg: Msg) -> None:
        received.append(msg.subject)

    await dispatcher.subscribe("_INBOX_gateway.>", cb=sniff)
    await dispatcher.flush()
    await violation(dispatcher, "_INBOX_gateway.>")
    for pattern in (">", "_INBOX.>"):  # nor everything, nor the default prefix
        await dispatcher.subscribe(pattern)
        await dispatcher.flush()
        await violation(dispatcher, f'subscription to "{pattern}"')

    # A request of the gateway still gets its reply (on the gateway's own prefix) ...
    async def answer(msg: Msg) -> None:
        await msg.respond(b"pong")

    await dispatcher.subscribe("cornserve.dispatch.invoke", cb=answer)
    await dispatcher.flush()
    gateway = await connect(GATEWAY)
    reply = await gateway.request("cornserve.dispatch.invoke", b"ping", timeout=DEADLINE)
    assert reply.data == b"pong" and reply.subject.startswith("_INBOX_gateway.")
    # ... and the dispatcher's refused subscriptions saw none of it.
    await dispatcher.flush()
    assert received == []


def test_a_reply_may_come_as_late_as_the_longest_deadline(
    auth_nats: tuple[NatsServerProcess, NatsAuth],
) -> None:
    # nats-server's default allow_responses window is 2 minutes: a deploy that took longer was
    # answered into a permissions violation, and the gateway waited out its 15-minute deadline.
    _, auth = auth_nats
    users = json.loads(auth.server_config.read_text())["authorization"]["users"]
    fields = {f.name: f.default for f in dataclasses.fields(ResourceManagerClient)}
    longest = float(fields["deploy_timeout_s"]) + float(fields["margin_s"])  # type: ignore[arg-type]
    for user in users:
        if user["user"] == ADMIN:
            continue
        window = user["permissions"]["allow_responses"]
        assert window["max"] == 1, user["user"]
        value, unit = window["expires"][:-1], window["expires"][-1]
        assert float(value) * {"s": 1, "m": 60, "h": 3600}[unit] > longest, (user["user"], window)


async def test_the_local_cluster_runs_with_auth(cluster: LocalCluster) -> None:
    """`cornserve up` turns authentication on by default: anonymous clients are refused, roles are confined."""
    assert cluster.nats_url is not None and cluster.nats_auth is not None
    state = json.loads((cluster.state_dir / "cluster.json").read_text())
    assert state["nats_auth_dir"] == str(cluster.nats_auth.directory)
    with pytest.raises(NatsAuthError):
        await connect_nats(cluster.nats_url, name="anonymous", first_connect_deadline_s=DEADLINE)
    gateway = await connect_nats(
        cluster.nats_url, name="test-gateway", creds=cluster.nats_auth.creds(GATEWAY)
    )
    admin = await admin_nats(cluster)
    try:
        heard: list[bytes] = []

        async def on_shutdown(msg: Msg) -> None:
            heard.append(msg.data)

        await admin.subscribe("cornserve.tm.*.shutdown", cb=on_shutdown)
        await admin.flush()
        await gateway.publish(tm_subject("anything", "shutdown"), b"{}")
        await gateway.flush()
        await violation(gateway, "cornserve.tm.anything.shutdown")
        await admin.publish("cornserve.tm.marker.shutdown", b"marker")  # arrives after the gateway's would
        await wait_for(lambda: heard, DEADLINE, "the admin's own marker message")
        assert heard == [b"marker"]
    finally:
        await gateway.close()
        await admin.close()


async def test_an_external_nats_with_nkey_users_takes_a_seed_file(tmp_path: Path) -> None:
    """`--nats-creds` for an operator's NATS: an nkey user seed file logs in; another user's seed does not."""
    seeds = [nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) for _ in range(2)]
    allowed = nkeys.from_seed(bytearray(seeds[0])).public_key.decode()
    config = write_secret_file(
        tmp_path / "nats.conf", json.dumps({"authorization": {"users": [{"nkey": allowed}]}})
    )
    good = write_secret_file(tmp_path / "good.nk", seeds[0].decode())
    stranger = write_secret_file(tmp_path / "stranger.nk", seeds[1].decode())
    with NatsServerProcess(store_dir=tmp_path / "store", config_file=config) as server:
        nc = await connect_nats(server.url, name="operator", creds=good)
        try:
            assert nc.is_connected
        finally:
            await nc.close()
        with pytest.raises(NatsAuthError, match=str(stranger)):
            await connect_nats(server.url, name="stranger", creds=stranger, first_connect_deadline_s=DEADLINE)
