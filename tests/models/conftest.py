"""Tiny checkpoints of every architecture (the plugin builds each once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.plugin import TinyCheckpoint

from cornserve.models.tiny import TINY_ARCHITECTURES


@pytest.fixture(scope="session")
def tiny_dirs(tiny_checkpoint: TinyCheckpoint) -> dict[str, Path]:
    return {arch: tiny_checkpoint(arch) for arch in TINY_ARCHITECTURES}
