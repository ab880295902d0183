"""Secret files are owner-only from birth, and readers refuse ones others can read."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cornserve.runtime.secrets import (
    SecretFileError,
    constant_time_equal,
    new_token,
    read_secret_file,
    write_secret_file,
)


def test_a_written_secret_is_0600_and_reads_back(tmp_path: Path) -> None:
    path = write_secret_file(tmp_path / "sub" / "admin-token", "abc\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_secret_file(path) == "abc"
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"]  # no temp file left


def test_a_group_readable_secret_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = write_secret_file(tmp_path / "token", "abc")
    path.chmod(0o640)
    with pytest.raises(SecretFileError, match="chmod 600"):
        read_secret_file(path)


def test_a_missing_secret_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="nope"):
        read_secret_file(tmp_path / "nope")


def test_tokens_are_fresh_and_compare_by_value() -> None:
    a, b = new_token(), new_token()
    assert a != b and len(a) >= 40
    assert constant_time_equal(a, a) and not constant_time_equal(a, b)
