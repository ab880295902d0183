"""NATS credentials files: which role a process plays on an authenticated NATS, read from one path.

A process is given one file (``--nats-creds`` / ``CORNSERVE_NATS_CREDS``); what kind it is follows
from its content, so the same setting serves the cluster `cornserve up` runs and an operator's NATS:

- a Cornserve role file (JSON ``{"user", "password", "inbox_prefix"}``), which `cornserve up` writes
  per role under ``<state dir>/nats-auth/``: user/password login, replies on the role's own inbox
  prefix (the server lets each role subscribe to its own prefix only);
- a standard NATS ``.creds`` file (a user JWT and its nkey seed, as ``nsc`` writes them);
- a bare nkey user seed (one line starting with ``SU``).

The last two are signed with nats-py's ``nkeys`` extra, a dependency of this package.

Every file is read with `cornserve.runtime.secrets.read_secret_file`: one that other users can read
is refused rather than used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cornserve.runtime.secrets import SecretFileError, read_secret_file

NATS_CREDS_ENV = "CORNSERVE_NATS_CREDS"
"""The variable `ServiceSettings.nats_creds` reads; parents set it to the child's role file."""

JWT_MARKER = "-----BEGIN NATS USER JWT-----"
"""How a standard NATS ``.creds`` file starts."""


class NatsCredentialsError(ValueError):
    """A credentials file is missing, readable by others, or in no format Cornserve knows."""


class RoleCredentials(BaseModel):
    """One role's login on the NATS of a `cornserve up` cluster (the content of ``<role>.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9-]*$")
    password: str = Field(min_length=16, max_length=256)
    inbox_prefix: str = Field(min_length=1, max_length=64, pattern=r"^_INBOX_[a-z0-9-]+$")
    """Replies to this role's requests arrive under ``<inbox_prefix>.>``, which only it may read."""


def nats_creds_from_env() -> Path | None:
    """The credentials file of a library living inside some process (the sidecar client), if any.

    Services get theirs from `ServiceSettings.nats_creds` (same variable); this is for code that has
    no settings model of its own.
    """
    value = os.environ.get(NATS_CREDS_ENV)
    return Path(value) if value else None


def connect_options(path: Path) -> dict[str, Any]:
    """The nats-py ``connect`` keyword arguments that log in with the credentials file `path`."""
    try:
        text = read_secret_file(path)
    except SecretFileError as exc:
        raise NatsCredentialsError(f"NATS credentials: {exc}") from None
    if text.startswith("{"):
        try:
            role = RoleCredentials.model_validate_json(text)
        except ValidationError as exc:
            raise NatsCredentialsError(
                f"NATS credentials file {path} is not a valid Cornserve role file: "
                f"{exc.errors(include_url=False)[0]['msg']}"
            ) from None
        return {"user": role.user, "password": role.password, "inbox_prefix": role.inbox_prefix}
    if JWT_MARKER in text:
        return {"user_credentials": str(path)}
    if text.startswith("SU") and len(text.split()) == 1:
        return {"nkeys_seed": str(path)}
    raise NatsCredentialsError(
        f"NATS credentials file {path} is neither a Cornserve role file (JSON), a NATS .creds file "
        "nor an nkey user seed"
    )


def role_file_text(role: RoleCredentials) -> str:
    """The content of a role file (what `connect_options` reads back)."""
    return json.dumps(role.model_dump(), indent=2) + "\n"
