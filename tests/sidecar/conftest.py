"""Sidecar tests: real servers come from the plugin's `sidecars` and `stats_of` fixtures (tests/support)."""

from __future__ import annotations

import pytest


@pytest.fixture
def env_nats(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """CORNSERVE_NATS_URL set for processes a test starts itself (producers, NCCL peers)."""
    monkeypatch.setenv("CORNSERVE_NATS_URL", nats_url)
    return nats_url
