"""Peer authentication of the TCP data path: an HMAC-SHA256 challenge/response under a cluster secret.

Anyone who can reach a sidecar's TCP port could otherwise make it reserve arena memory and write
bytes that a consumer will read as a tensor. So before any header is read, both ends prove that
they hold the same per-cluster secret (``--peer-secret-file``) without sending it: the receiver
challenges with a fresh nonce, the sender answers ``HMAC(secret, nonce, ranks, its own nonce)``,
and the receiver answers the sender's nonce in turn (mutual: a sender never streams a payload to
an impostor listening on a peer's address). The MACs bind both ranks, so an answer for one pair of
servers is worth nothing for another. The stream itself is neither encrypted nor integrity
protected afterwards: run cross-node traffic on a network you trust (docs/sidecar.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from cornserve.runtime.secrets import SecretFileError, constant_time_equal, read_secret_file

DOMAIN = b"cornserve-sidecar-tcp-v1"
"""Separates these MACs from any other use of the same secret (and from later protocol versions)."""
NONCE_BYTES = 32
"""Random bytes per challenge (hex on the wire)."""
MIN_SECRET_CHARS = 16
"""A shorter secret is a typo or a placeholder, not a key (`cornserve up` writes 43 characters)."""


def new_nonce() -> str:
    """A fresh challenge: 32 random bytes as hex."""
    return secrets.token_hex(NONCE_BYTES)


@dataclass(frozen=True)
class PeerKey:
    """The cluster's peer secret and the two MACs of the handshake.

    ``repr`` never shows the secret (it may end up in a log line).
    """

    secret: bytes

    def __repr__(self) -> str:
        return "PeerKey(<secret>)"

    def _mac(self, role: bytes, *parts: str | int) -> str:
        msg = b"\0".join([DOMAIN, role, *(str(p).encode() for p in parts)])
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def sender_mac(self, challenge: str, source_rank: int, dst_rank: int, sender_nonce: str) -> str:
        """The sender's answer to the receiver's ``challenge``."""
        return self._mac(b"sender", challenge, source_rank, dst_rank, sender_nonce)

    def receiver_mac(self, sender_nonce: str, challenge: str, source_rank: int, dst_rank: int) -> str:
        """The receiver's answer to the sender's nonce (its half of the mutual proof)."""
        return self._mac(b"receiver", sender_nonce, challenge, source_rank, dst_rank)

    @staticmethod
    def matches(given: str, expected: str) -> bool:
        """Compare MACs in constant time."""
        return constant_time_equal(given, expected)


def load_peer_key(path: Path | None) -> PeerKey | None:
    """The key in secret file ``path`` (None when no file is configured).

    Raises :class:`~cornserve.runtime.secrets.SecretFileError` for a file others can read, a missing
    or unreadable file, or one too short to be a key.
    """
    if path is None:
        return None
    value = read_secret_file(path)
    if len(value) < MIN_SECRET_CHARS:
        raise SecretFileError(
            f"peer secret file {path} holds {len(value)} characters; a key needs at least "
            f"{MIN_SECRET_CHARS} (`cornserve up` generates one)"
        )
    return PeerKey(value.encode())
