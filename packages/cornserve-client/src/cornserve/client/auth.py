"""Which bearer token the client sends, and how it trusts an HTTPS gateway.

One resolution order for the CLI, notebooks and scripts: an explicit token, then
``CORNSERVE_ADMIN_TOKEN``, then ``CORNSERVE_API_KEY`` (an invoke key handed to a user), then the
admin token `cornserve up` wrote to ``<state dir>/admin-token``. The state-dir token is only sent to
a gateway on this machine (a loopback address) or to the URL that state dir's running cluster
recorded, so pointing the CLI at another cluster never hands it the local cluster's admin token.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cornserve.client.errors import CornserveAuthError, CornserveError
from cornserve.runtime.secrets import SecretFileError, read_secret_file
from cornserve.runtime.statedir import admin_token_path, default_state_dir

ADMIN_TOKEN_ENV = "CORNSERVE_ADMIN_TOKEN"
API_KEY_ENV = "CORNSERVE_API_KEY"
CA_FILE_ENV = "CORNSERVE_CA_FILE"
"""A PEM file of the CA (or the self-signed certificate) an HTTPS gateway's certificate chains to."""


@dataclass(frozen=True)
class Token:
    """A bearer token and where it came from (for error messages; the value is never shown)."""

    value: str = field(repr=False)
    source: str


def _is_local(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _recorded_url(state_dir: Path) -> str | None:
    try:
        state = json.loads((state_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return None
    url = state.get("url") if isinstance(state, dict) else None
    return url.rstrip("/") if isinstance(url, str) else None


def resolve_token(url: str, token: str | None = None, state_dir: Path | None = None) -> Token | None:
    """The token to send to the gateway at `url`, or None when there is none to send.

    Raises CornserveAuthError when the state dir's token file exists but is unsafe or unreadable.
    """
    if token:
        return Token(token, "the token argument")
    for env in (ADMIN_TOKEN_ENV, API_KEY_ENV):
        value = os.environ.get(env, "").strip()
        if value:
            return Token(value, f"${env}")
    directory = state_dir if state_dir is not None else default_state_dir()
    path = admin_token_path(directory)
    if not path.exists():
        return None
    if not (_is_local(url) or _recorded_url(directory) == url.rstrip("/")):
        return None
    try:
        return Token(read_secret_file(path), str(path))
    except SecretFileError as exc:
        raise CornserveAuthError(401, "token_file", str(exc)) from None


def how_to_authenticate(state_dir: Path | None = None) -> str:
    """The sentence telling a user how to give the client a token."""
    path = admin_token_path(state_dir if state_dir is not None else default_state_dir())
    return (
        f"set ${ADMIN_TOKEN_ENV} (or ${API_KEY_ENV} with an API key, to invoke apps) or pass token=...; "
        f"`cornserve up` keeps the admin token of a local cluster in {path}"
    )


def client_ssl_context(ca_file: str | Path | None = None) -> ssl.SSLContext | None:
    """A context trusting `ca_file` (or ``$CORNSERVE_CA_FILE``) besides the system CAs; None for defaults."""
    chosen = ca_file or os.environ.get(CA_FILE_ENV) or None
    if chosen is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(chosen))
    except (OSError, ssl.SSLError) as exc:
        raise CornserveError(0, "tls_config", f"cannot load the CA file {chosen}: {exc}") from None
