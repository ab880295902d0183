"""Shared fixtures: one real nats-server (JetStream on) per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cornserve.cli.natsserver import NatsServerProcess


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServerProcess]:
    """A real nats-server on a free loopback port, shared by the whole session."""
    with NatsServerProcess() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServerProcess) -> str:
    """URL of the session's nats-server."""
    return nats_server.url
