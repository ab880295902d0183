"""TLS for the gateway's HTTP API, and the warning when tokens would cross a network in clear text."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path


class TLSConfigError(RuntimeError):
    """The certificate or key cannot be loaded; the message names the file and the reason."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context serving `cert` (PEM, chain allowed) with private key `key` (PEM)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except FileNotFoundError as exc:
        raise TLSConfigError(f"cannot read {exc.filename}: no such file") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"cannot load the TLS certificate {cert} with key {key}: {exc}") from None
    return context


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (localhost or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface
