"""NATS authentication of a `cornserve up` cluster: one user per role, each with allow-list permissions.

Why users with random passwords rather than nkeys: nats-py logs in with them without the ``nkeys``
package (a native dependency every service would need), the server config is 0600 like the role
files, and the server sees exactly the same thing either way: a user whose permissions follow from
the role. Every service's connection is one role (the file it is handed); what a role may do is
derived from the subjects in `cornserve.bus` here, in one table, so it is reviewed in one place.

Publish and subscribe are allow-lists (everything else is denied). Replies use `allow_responses`: a
role answers requests it received without a right to publish to anyone's inbox. Each role receives
replies on its own inbox prefix (``_INBOX_<role>``, in its role file) and may subscribe to no other,
so no connection reads another role's replies. JetStream KV access is spelled out per bucket: only
the gateway writes (or creates) the apps and task-library buckets, only the resource manager the
deployments bucket; every service may read the task-library bucket (they all load task libraries).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client

from cornserve.bus.control import (
    DISPATCH_CANCEL,
    DISPATCH_INVOKE,
    KV_APPS,
    KV_DEPLOYMENTS,
    KV_TASKLIBS,
    RM_DEPLOY,
    RM_PREFIX,
    RM_RELEASE,
    RM_SCALE,
    RM_STATE,
    TM_PREFIX,
)
from cornserve.bus.kv import open_bucket
from cornserve.bus.subjects import SIDECAR_PREFIX, SidecarVerb
from cornserve.runtime.nats import connect_nats
from cornserve.runtime.natscreds import RoleCredentials, role_file_text
from cornserve.runtime.secrets import new_token, write_secret_file

AUTH_DIR = "nats-auth"
"""Under the state dir: ``<role>.json`` per role and the server's ``server.conf``."""
SERVER_CONFIG = "server.conf"

GATEWAY = "gateway"
RESOURCE_MANAGER = "resource-manager"
DISPATCHER = "dispatcher"
TASK_MANAGER = "task-manager"
SIDECAR = "sidecar"
EXECUTOR = "executor"
ADMIN = "admin"
"""Everything: for `cornserve up` itself (it creates the KV buckets) and an operator's tools."""

MICRO = "$SRV.>"
"""nats.micro discovery subjects a service answers on (PING, INFO, STATS)."""
CLIENT_VERBS = (
    SidecarVerb.INFO,
    SidecarVerb.STATS,
    SidecarVerb.ALLOC,
    SidecarVerb.FREE,
    SidecarVerb.SEND,
    SidecarVerb.RECV,
    SidecarVerb.DONE,
    SidecarVerb.CLOSE,
)
"""The sidecar endpoints an executor's client library calls (peer verbs are for sidecars only)."""


RESPONSE_WINDOW = "24h"
"""How long after a request its receiver may still reply (`allow_responses`' ``expires``).

The server's default is 2 minutes, and a reply after it is refused as a permissions violation and
never arrives: a deploy that takes longer (executors loading a model) left the gateway waiting out
its whole deploy deadline. A reply is allowed once (``max``), and the window only has to exceed
every deadline a requester waits (the gateway's deploy deadline is 15 minutes by default).
"""


def inbox_prefix(role: str) -> str:
    """Where replies to `role`'s requests arrive; only `role` may subscribe to it."""
    return f"_INBOX_{role}"


def kv_read(bucket: str) -> list[str]:
    """What reading (get, list, watch) a KV bucket publishes: the JetStream API on its stream only."""
    stream = f"KV_{bucket}"
    return [
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def kv_write(bucket: str) -> list[str]:
    """`kv_read` plus putting and deleting keys and creating the bucket's stream."""
    return [*kv_read(bucket), f"$KV.{bucket}.>", f"$JS.API.STREAM.CREATE.KV_{bucket}"]


@dataclass(frozen=True)
class RolePermissions:
    """What one role may publish and subscribe to (allow-lists); its own inbox is always added."""

    publish: list[str]
    subscribe: list[str] = field(default_factory=list)


def role_permissions() -> dict[str, RolePermissions]:
    """The permission table of every service role (the admin role is unrestricted)."""
    tm_any = f"{TM_PREFIX}.*"
    return {
        GATEWAY: RolePermissions(
            publish=[
                RM_DEPLOY,
                RM_RELEASE,
                RM_STATE,
                RM_SCALE,
                DISPATCH_INVOKE,
                DISPATCH_CANCEL,
                "$SRV.PING",
                "$SRV.PING.>",
                "$SRV.INFO",
                "$SRV.INFO.>",
                *kv_write(KV_APPS),
                *kv_write(KV_TASKLIBS),
            ],
            subscribe=[MICRO, f"{RM_PREFIX}.events.>"],
        ),
        RESOURCE_MANAGER: RolePermissions(
            publish=[
                f"{RM_PREFIX}.events.>",
                f"{tm_any}.assign",
                f"{tm_any}.status",
                f"{tm_any}.shutdown",
                *kv_write(KV_DEPLOYMENTS),
                *kv_read(KV_TASKLIBS),
            ],
            subscribe=[MICRO, RM_DEPLOY, RM_RELEASE, RM_STATE, RM_SCALE],
        ),
        DISPATCHER: RolePermissions(
            publish=[
                RM_STATE,
                f"{tm_any}.route",
                f"{tm_any}.done",
                f"{tm_any}.usage",
                # A given-up graph's forwards are dropped in their sidecars (cornserve.dispatcher.forwards).
                f"{SIDECAR_PREFIX}.*.{SidecarVerb.DROP.value}",
                # Keepalives, streamed items and replies go to the calling gateway's graph inbox.
                f"{inbox_prefix(GATEWAY)}.>",
                *kv_read(KV_TASKLIBS),
            ],
            subscribe=[MICRO, DISPATCH_INVOKE, DISPATCH_CANCEL, f"{RM_PREFIX}.events.>", f"{tm_any}.table"],
        ),
        TASK_MANAGER: RolePermissions(
            # Its executor table, for dispatchers to route from (cornserve.task_manager.table).
            publish=[f"{tm_any}.table", *kv_read(KV_TASKLIBS)],
            subscribe=[MICRO, f"{tm_any}.*"],
        ),
        SIDECAR: RolePermissions(
            publish=[f"{SIDECAR_PREFIX}.>"],
            subscribe=[MICRO, f"{SIDECAR_PREFIX}.>"],
        ),
        EXECUTOR: RolePermissions(
            publish=[
                *(f"{SIDECAR_PREFIX}.*.{verb.value}" for verb in CLIENT_VERBS),
                # GPU forwards across nodes: pull requests (carrying the NCCL unique id) to the producer's client.
                f"{SIDECAR_PREFIX}.*.nccl.pull",
                # A stream the dispatcher lets it publish (STREAM_SUBJECT_HEADER): only stream subjects of
                # a graph inbox (`<inbox>.stream`, `<inbox>.<box>.stream`), never a reply; the inbox and
                # box tokens are random, so an executor reaches only the streams it was given.
                f"{inbox_prefix(GATEWAY)}.*.stream",
                f"{inbox_prefix(GATEWAY)}.*.*.stream",
                *kv_read(KV_TASKLIBS),
            ],
            subscribe=[
                f"{SIDECAR_PREFIX}.*.events.released",
                f"{SIDECAR_PREFIX}.*.nccl.pull",
            ],
        ),
    }


ROLES = (GATEWAY, RESOURCE_MANAGER, DISPATCHER, TASK_MANAGER, SIDECAR, EXECUTOR, ADMIN)


@dataclass(frozen=True)
class NatsAuth:
    """The credentials of one cluster: a role file per role and the server config that accepts them."""

    directory: Path

    def creds(self, role: str) -> Path:
        """The credentials file of `role`."""
        if role not in ROLES:
            raise ValueError(f"unknown NATS role {role!r}; roles: {', '.join(ROLES)}")
        return self.directory / f"{role}.json"

    @property
    def server_config(self) -> Path:
        """The nats-server config file with the ``authorization`` block."""
        return self.directory / SERVER_CONFIG

    @classmethod
    def generate(cls, directory: Path) -> NatsAuth:
        """New random passwords for every role (replacing earlier ones); files and config are 0600."""
        auth = cls(directory)
        table = role_permissions()
        users = []
        for role in ROLES:
            creds = RoleCredentials(user=role, password=new_token(), inbox_prefix=inbox_prefix(role))
            write_secret_file(auth.creds(role), role_file_text(creds))
            user: dict[str, object] = {"user": role, "password": creds.password}
            if role != ADMIN:
                perms = table[role]
                user["permissions"] = {
                    "publish": {"allow": perms.publish},
                    "subscribe": {"allow": [*perms.subscribe, f"{creds.inbox_prefix}.>"]},
                    "allow_responses": {"max": 1, "expires": RESPONSE_WINDOW},
                }
            users.append(user)
        config = {"authorization": {"users": users}}
        write_secret_file(auth.server_config, json.dumps(config, indent=2) + "\n")
        return auth


BUCKETS = (KV_APPS, KV_TASKLIBS, KV_DEPLOYMENTS)


class JetStreamUnavailable(TimeoutError):
    """JetStream did not answer (no meta leader elected, too few servers) before the deadline."""


JETSTREAM_POLL_S = 0.25
"""Pause between tries while a clustered JetStream elects its meta leader."""


def create_buckets(nats_url: str, creds: Path, timeout_s: float = 30.0, replicas: int = 1) -> None:
    """Create the cluster's KV buckets before any service starts; existing ones are left as they are.

    Services may only read the buckets they do not own, and may not create them. `nats_url` may list
    a cluster's servers (comma-separated); `replicas` is each new bucket's replica count (3 on a
    3-server cluster). A clustered JetStream answers only once its servers have elected a meta
    leader and know their peers, so this first waits for JetStream and retries a creation that is
    refused, all within `timeout_s`; then it raises `JetStreamUnavailable` with the last answer.
    """

    async def create() -> None:
        nc = await connect_nats(nats_url, name="cornserve-up", creds=creds)
        try:
            await _wait_jetstream(nc, nats_url, timeout_s)
            deadline = time.monotonic() + timeout_s
            for bucket in BUCKETS:
                while True:
                    try:
                        await open_bucket(nc, bucket, replicas=replicas)
                        break
                    except nats.errors.Error as exc:  # e.g. not all peers known yet
                        if time.monotonic() >= deadline:
                            raise JetStreamUnavailable(
                                f"cannot create KV bucket {bucket} with {replicas} replica(s) on NATS at "
                                f"{nats_url} within {timeout_s:g} s: {type(exc).__name__}: {exc}"
                            ) from exc
                        await asyncio.sleep(JETSTREAM_POLL_S)
        finally:
            await nc.close()

    async def bounded() -> None:
        async with asyncio.timeout(timeout_s * 2 + 10):  # the two waits above each have their own deadline
            await create()

    asyncio.run(bounded())


async def _wait_jetstream(nc: Client, nats_url: str, timeout_s: float) -> None:
    """Return once JetStream answers an account-info request (clustered: a meta leader exists)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    js = nc.jetstream(timeout=1.0)
    while time.monotonic() < deadline:
        try:
            await js.account_info()
            return
        except nats.errors.Error as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(JETSTREAM_POLL_S)
    raise JetStreamUnavailable(
        f"JetStream on NATS at {nats_url} did not answer "
        f"within {timeout_s:g} s (a cluster without a meta leader: are the other servers up and routed? "
        f"see their logs); last answer: {last}"
    )
