"""Fixtures for the dispatcher tests (helpers and stand-ins live in support.py)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client
from tests.dispatcher.support import (
    LIBRARY,
    DispatcherReplica,
    StandInControlPlane,
    start_dispatchers,
    stop_dispatchers,
)
from tests.support.tasklibs import upload_library

from cornserve.cli.natsserver import NatsServerProcess


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A plain NATS connection to the session's server (the keepalive and usage-report tests)."""
    client = await nats.connect(nats_url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def lib() -> types.ModuleType:
    """The test task library, loaded in this process the way every service loads it."""
    return LIBRARY.load()


@pytest.fixture(scope="module")
def dispatch_nats(private_nats: NatsServerProcess) -> NatsServerProcess:
    """The module's own nats-server (no other test's services share its subjects), library uploaded."""
    asyncio.run(upload_library(private_nats.url, LIBRARY))
    return private_nats


@pytest.fixture(scope="module")
def dispatchers(
    dispatch_nats: NatsServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[DispatcherReplica]]:
    """Two dispatcher replicas in one queue group, for the whole module."""
    procs = start_dispatchers(dispatch_nats.url, ["d1", "d2"], tmp_path_factory.mktemp("dispatchers"))
    yield procs
    stop_dispatchers(procs)


@pytest.fixture
async def control_plane(
    dispatch_nats: NatsServerProcess, dispatchers: list[DispatcherReplica]
) -> AsyncIterator[StandInControlPlane]:
    """Stand-in RM (answering state) with no deployments yet, next to the module's dispatchers."""
    nc = await nats.connect(dispatch_nats.url)
    c = StandInControlPlane(nc)
    await c.start_rm()
    try:
        yield c
    finally:
        await c.close()
        await nc.close()
