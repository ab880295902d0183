"""NATS credentials files: the kind follows from the content, and every kind is read owner-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from cornserve.runtime.natscreds import (
    NatsCredentialsError,
    RoleCredentials,
    connect_options,
    nats_creds_from_env,
    role_file_text,
)
from cornserve.runtime.secrets import write_secret_file

JWT_CREDS = """-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln
------END NATS USER JWT------

-----BEGIN USER NKEY SEED-----
SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4
------END USER NKEY SEED------
"""


def test_a_role_file_logs_in_with_its_user_and_inbox_prefix(tmp_path: Path) -> None:
    role = RoleCredentials(user="gateway", password="p" * 43, inbox_prefix="_INBOX_gateway")
    path = write_secret_file(tmp_path / "gateway.json", role_file_text(role))
    assert connect_options(path) == {
        "user": "gateway",
        "password": "p" * 43,
        "inbox_prefix": "_INBOX_gateway",
    }


def test_a_nats_creds_file_and_an_nkey_seed_go_to_nats_py(tmp_path: Path) -> None:
    creds = write_secret_file(tmp_path / "user.creds", JWT_CREDS)
    assert connect_options(creds) == {"user_credentials": str(creds)}
    seed = write_secret_file(
        tmp_path / "user.nk", "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4\n"
    )
    assert connect_options(seed) == {"nkeys_seed": str(seed)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user:password", "neither a Cornserve role file"),
        ('{"user": "gateway"}', "not a valid Cornserve role file"),
        ('{"user": "gateway", "password": "short", "inbox_prefix": "_INBOX_gateway"}', "not a valid"),
        ('{"user": "gateway", "password": "' + "p" * 43 + '", "inbox_prefix": "_INBOX"}', "not a valid"),
    ],
)
def test_anything_else_is_refused(tmp_path: Path, content: str, message: str) -> None:
    path = write_secret_file(tmp_path / "creds", content)
    with pytest.raises(NatsCredentialsError, match=message):
        connect_options(path)


def test_a_missing_or_shared_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NatsCredentialsError, match="cannot read"):
        connect_options(tmp_path / "absent.creds")
    shared = tmp_path / "shared.creds"
    shared.write_text(JWT_CREDS)
    shared.chmod(0o644)
    with pytest.raises(NatsCredentialsError, match="chmod 600"):
        connect_options(shared)


def test_libraries_read_the_credentials_path_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORNSERVE_NATS_CREDS", raising=False)
    assert nats_creds_from_env() is None
    monkeypatch.setenv("CORNSERVE_NATS_CREDS", "/run/cornserve/executor.json")
    assert nats_creds_from_env() == Path("/run/cornserve/executor.json")
