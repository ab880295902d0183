"""Tiny checkpoints built once per test session (each takes a few seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cornserve.models.tiny import TINY_ARCHITECTURES, build_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny(arch, root / arch, seed=0) for arch in TINY_ARCHITECTURES}
