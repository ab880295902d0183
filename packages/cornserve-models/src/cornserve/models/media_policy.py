"""What media an executor may load: which directories, which addresses, how big, how long.

`MediaPolicy` is a pydantic model whose fields are named ``media_*`` so that an executor's settings
(a `ServiceSettings` subclass) can inherit it and get them as flags ``--media-*`` and environment
``CORNSERVE_MEDIA_*``; library code builds one directly. Lists (`media_dirs`, `media_allow_hosts`)
are comma-separated, like every list setting of Cornserve (an IPv6 network has colons in it).

Why the defaults are closed: a media URL is chosen by whoever sends the request. Without a policy a
`file:` URL reads any file the executor can read, and an `http:` URL reaches whatever the executor's
network reaches (cloud metadata at 169.254.169.254, services on localhost), and the error messages
tell the caller which files exist and which ports are open.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def split_list(value: str) -> list[str]:
    """The non-empty, stripped entries of a comma-separated setting."""
    return [part.strip() for part in value.split(",") if part.strip()]


class MediaPolicy(BaseModel):
    """The limits every media item is loaded under (see the module docstring for the spelling)."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    media_dirs: str = ""
    """Comma-separated absolute directories `file:` URLs may read under (empty: `file:` is off)."""
    media_allow_hosts: str = ""
    """Comma-separated hosts, IP addresses or CIDR networks `http(s):` may reach even when private or loopback."""
    media_timeout_s: float = Field(default=30.0, gt=0)
    """One deadline for fetching and decoding one media item, slow senders included."""
    media_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Largest media item, in bytes (files, HTTP bodies and decoded data: URLs)."""
    media_max_redirects: int = Field(default=3, ge=0)
    """Most HTTP redirects followed for one item (each hop is checked again)."""
    media_max_pixels: int = Field(default=25_000_000, ge=1)
    """Largest image, in pixels (width times height), checked before decoding."""
    media_video_max_frames: int = Field(default=64, ge=1)
    """Frames kept from a video (longer videos are sampled evenly down to this)."""
    media_video_max_pixels: int = Field(default=3840 * 2160, ge=1)
    """Largest video frame, in pixels (width times height), checked before decoding."""
    media_video_max_duration_s: float = Field(default=600.0, gt=0)
    """Longest video, in seconds."""
    media_workers: int = Field(default=4, ge=1)
    """Threads fetching and decoding media, apart from the executor's compute thread."""
    media_queue: int = Field(default=64, ge=0)
    """Media items that may wait for a media thread; beyond that a request is answered 503."""

    @field_validator("media_dirs")
    @classmethod
    def _dirs_are_absolute(cls, value: str) -> str:
        for entry in split_list(value):
            if not os.path.isabs(entry):
                raise ValueError(f"media directories must be absolute paths, got {entry!r}")
        return value

    @field_validator("media_allow_hosts")
    @classmethod
    def _hosts_parse(cls, value: str) -> str:
        for entry in split_list(value):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not entry.replace("-", "").replace(".", "").isalnum():
                    raise ValueError(
                        f"media allow-list entries are hosts, IP addresses or CIDR networks, got {entry!r}"
                    ) from None
        return value

    def allowed_dirs(self) -> list[Path]:
        """The media directories, symlinks resolved (a missing one is kept: it may appear later)."""
        return [Path(entry).resolve() for entry in split_list(self.media_dirs)]

    def allowed_networks(self) -> list[IPNetwork]:
        """The allow-listed addresses and networks."""
        networks: list[IPNetwork] = []
        for entry in split_list(self.media_allow_hosts):
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        return networks

    def allowed_hostnames(self) -> set[str]:
        """The allow-listed host names (lower case, no trailing dot)."""
        names: set[str] = set()
        for entry in split_list(self.media_allow_hosts):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                names.add(entry.lower().rstrip("."))
        return names

    def media_policy(self) -> MediaPolicy:
        """Just the media fields (an executor's settings inherit this class and hand this on)."""
        return MediaPolicy.model_validate({name: getattr(self, name) for name in MediaPolicy.model_fields})


def public_address(address: IPAddress) -> bool:
    """Whether `address` is a public unicast address (not loopback, private, link-local, multicast, ...).

    An IPv4-mapped or 6to4/Teredo-embedded IPv6 address is judged by the IPv4 address inside it.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return public_address(embedded)
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def address_allowed(policy: MediaPolicy, host: str, address: IPAddress) -> bool:
    """Whether an `http(s):` fetch of `host` may connect to `address` under `policy`."""
    if public_address(address):
        return True
    if host.lower().rstrip(".") in policy.allowed_hostnames():
        return True
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in policy.allowed_networks())
