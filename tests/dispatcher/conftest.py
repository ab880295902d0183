"""Fixtures for the dispatcher tests (helpers and stand-ins live in support.py)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from tests.dispatcher.support import (
    LIBRARY_NAME,
    LIBRARY_SOURCE,
    Cluster,
    DispatcherProc,
    start_dispatchers,
    stop_dispatchers,
    upload_library,
)

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.task.library import load_task_library


@pytest.fixture(scope="session")
def lib() -> types.ModuleType:
    """The test task library, loaded in this process the way every service loads it."""
    return load_task_library(LIBRARY_NAME, LIBRARY_SOURCE).module


@pytest.fixture(scope="module")
def nats_module() -> Iterator[NatsServerProcess]:
    """A nats-server of this module's own, so no other test's services share its subjects."""
    with NatsServerProcess() as server:
        asyncio.run(upload_library(server.url))
        yield server


@pytest.fixture(scope="module")
def dispatchers(
    nats_module: NatsServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[DispatcherProc]]:
    """Two dispatcher replicas in one queue group, for the whole module."""
    procs = start_dispatchers(nats_module.url, ["d1", "d2"], tmp_path_factory.mktemp("dispatchers"))
    yield procs
    stop_dispatchers(procs)


@pytest.fixture
async def cluster(
    nats_module: NatsServerProcess, dispatchers: list[DispatcherProc]
) -> AsyncIterator[Cluster]:
    """Stand-in RM (answering state) with no deployments yet, next to the module's dispatchers."""
    nc = await nats.connect(nats_module.url)
    c = Cluster(nc)
    await c.start_rm()
    try:
        yield c
    finally:
        await c.close()
        await nc.close()
