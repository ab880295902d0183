"""The bytes behind a media URL (`data:`, `file:`, `http(s):`), fetched under a `MediaPolicy`.

Blocking code with one deadline: run it in the media pool (`cornserve.models.media_pool`).

- `file:` reads only below `media_dirs`, after resolving symlinks and `..`; a refused, missing,
  unreadable or non-regular path all get one and the same message, so the error is no filesystem oracle.
- `http(s):` resolves the host first and checks every address (`address_allowed`) before any
  connection; it then connects to a checked address itself (so the address checked is the address
  used: no DNS-rebinding window) and speaks HTTP over that socket with the original Host header and
  TLS server name. Redirects are followed by hand, each hop checked again, at most
  `media_max_redirects`. A watchdog shuts the socket down at the deadline, so a server dripping
  one byte a second fails at the deadline like a silent one; bodies are counted against
  `media_max_bytes` as they arrive (and `Content-Length` is checked first).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from cornserve.models.media_errors import (
    MediaFetchError,
    MediaRefusedError,
    MediaTimeoutError,
    MediaTooLargeError,
    shorten_url,
)
from cornserve.models.media_policy import IPAddress, MediaPolicy, address_allowed

_READ_BLOCK = 1 << 16
_REDIRECTS = {301, 302, 303, 307, 308}

_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="media-dns")
"""getaddrinfo has no timeout of its own: it runs here and is waited for with the deadline."""


class Deadline:
    """The one deadline of loading a media item (fetch and decode)."""

    def __init__(self, timeout_s: float, url: str) -> None:
        self.timeout_s = timeout_s
        self.url = url
        self.at = time.monotonic() + timeout_s

    def remaining(self) -> float:
        """Seconds left; raises MediaTimeoutError when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def error(self) -> MediaTimeoutError:
        """The timeout error for this item."""
        return MediaTimeoutError(
            f"loading {shorten_url(self.url)!r} took over the media deadline of {self.timeout_s:g}s", self.url
        )


def _too_large(url: str, limit: int, size: int | None = None) -> MediaTooLargeError:
    what = f"is {size} bytes" if size is not None else "is larger than that"
    return MediaTooLargeError(f"{shorten_url(url)!r} {what}; the limit is {limit} bytes", url)


# ---------------------------------------------------------------------------------------- data:


def read_data_url(url: str, policy: MediaPolicy) -> bytes:
    """The payload of a `data:` URL, refused before decoding when it would be over the byte cap."""
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise MediaFetchError(f"malformed data: URL (no comma) {shorten_url(url)!r}", url)
    limit = policy.media_max_bytes
    if header.endswith(";base64"):
        if len(payload) // 4 * 3 > limit + 3:
            raise _too_large(url, limit)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaFetchError(f"data: URL {shorten_url(url)!r} has invalid base64: {exc}", url) from exc
    else:
        if len(payload) > 3 * limit:
            raise _too_large(url, limit)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > limit:
        raise _too_large(url, limit, len(data))
    return data


# ---------------------------------------------------------------------------------------- file:


def _under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def read_file_url(url: str, policy: MediaPolicy) -> bytes:
    """The bytes of a `file:` URL below one of `policy.media_dirs` (one message for every refusal)."""
    dirs = policy.allowed_dirs()
    if not dirs:
        raise MediaRefusedError(
            f"file: URLs are off on this executor ({shorten_url(url)!r}); an operator enables them for "
            "chosen directories with CORNSERVE_MEDIA_DIRS",
            url,
        )
    refused = MediaRefusedError(
        f"{shorten_url(url)!r} is not in an allowed media directory or cannot be read", url
    )
    parsed = urllib.parse.urlparse(url)
    raw = urllib.parse.unquote(parsed.path)
    if parsed.netloc not in ("", "localhost") or not os.path.isabs(raw) or "\x00" in raw:
        raise refused
    allowed = sorted(
        {os.path.normpath(entry) for entry in policy.media_dirs.split(",") if entry.strip()}
        | {str(d) for d in dirs}
    )
    # Lexically outside every media dir: refused without touching the filesystem.
    if not _under(os.path.normpath(raw), allowed):
        raise refused
    try:
        real = str(Path(raw).resolve(strict=True))
    except (OSError, RuntimeError):
        raise refused from None
    if not _under(real, [str(d) for d in dirs]):  # a symlink out of the media dirs
        raise refused
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise refused from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a directory, FIFO or device: the same refusal
            raise refused
        if info.st_size > policy.media_max_bytes:
            raise _too_large(url, policy.media_max_bytes, info.st_size)
        chunks: list[bytes] = []
        total = 0
        while block := os.read(fd, _READ_BLOCK):
            total += len(block)
            if total > policy.media_max_bytes:  # it grew after the fstat
                raise _too_large(url, policy.media_max_bytes)
            chunks.append(block)
    except OSError:
        raise refused from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > policy.media_max_bytes:
        raise _too_large(url, policy.media_max_bytes)
    return data


# ---------------------------------------------------------------------------------------- http(s):


def _resolve(host: str, port: int, url: str, deadline: Deadline) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=deadline.remaining())
    except FutureTimeout:
        raise deadline.error() from None
    except OSError:
        raise MediaFetchError(
            f"cannot fetch {shorten_url(url)!r}: the host name does not resolve", url
        ) from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise MediaFetchError(f"cannot fetch {shorten_url(url)!r}: the host name does not resolve", url)
    return addresses


def _connect(addresses: list[IPAddress], port: int, url: str, deadline: Deadline) -> socket.socket:
    for address in addresses:
        try:
            return socket.create_connection((str(address), port), timeout=deadline.remaining())
        except MediaTimeoutError:
            raise
        except OSError:
            continue
    deadline.remaining()
    raise MediaFetchError(f"could not fetch {shorten_url(url)!r}: cannot connect to the server", url)


class _Watchdog:
    """Shuts a connection down at the deadline, so no read (headers included) outlives it."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self._shadow = socket.socket(fileno=os.dup(sock.fileno()))
        self._timer = threading.Timer(max(0.0, deadline.at - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._lock = threading.Lock()
        self._closed = False
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._closed:
                # ENOTCONN: the peer already closed it, which is all the watchdog wanted.
                with contextlib.suppress(OSError):
                    self._shadow.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop watching (the connection is done)."""
        self._timer.cancel()
        with self._lock:
            self._closed = True
            self._shadow.close()


def _one_request(url: str, policy: MediaPolicy, deadline: Deadline) -> tuple[bytes | None, str | None]:
    """(body, None) for a 2xx answer, (None, location) for a redirect; raises otherwise."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise MediaFetchError(f"{shorten_url(url)!r} has an invalid port", url) from None
    if not host:
        raise MediaFetchError(f"{shorten_url(url)!r} names no host", url)
    if parts.username or parts.password:
        raise MediaRefusedError(f"{shorten_url(url)!r}: URLs with credentials are refused", url)
    addresses = _resolve(host, port, url, deadline)
    if not all(address_allowed(policy, host, address) for address in addresses):
        raise MediaRefusedError(
            f"{shorten_url(url)!r} refused: the address is not allowed (loopback, private, link-local "
            "and multicast addresses need CORNSERVE_MEDIA_ALLOW_HOSTS)",
            url,
        )
    sock = _connect(addresses, port, url, deadline)
    watchdog = _Watchdog(sock, deadline)
    conn: http.client.HTTPConnection | None = None
    response: http.client.HTTPResponse | None = None
    try:
        if parts.scheme == "https":
            context = ssl.create_default_context()
            sock.settimeout(deadline.remaining())
            sock = context.wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port, timeout=deadline.remaining(), context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=deadline.remaining())
        conn.sock = sock  # already connected, to the checked address: no second resolution
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        sock.settimeout(deadline.remaining())
        conn.request(
            "GET", target, headers={"User-Agent": "cornserve-media/1", "Accept-Encoding": "identity"}
        )
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise MediaFetchError(f"{shorten_url(url)!r} redirects without a Location", url)
            return None, urllib.parse.urljoin(url, location)
        if not 200 <= response.status < 300:
            raise MediaFetchError(
                f"fetching {shorten_url(url)!r} failed: HTTP {response.status} {response.reason}", url
            )
        limit = policy.media_max_bytes
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            raise _too_large(url, limit, int(length))
        chunks: list[bytes] = []
        total = 0
        while True:
            sock.settimeout(deadline.remaining())
            block = response.read1(_READ_BLOCK)
            deadline.remaining()
            if not block:
                return b"".join(chunks), None
            total += len(block)
            if total > limit:
                raise _too_large(url, limit)
            chunks.append(block)
    except (OSError, http.client.HTTPException) as exc:
        deadline.remaining()  # a read cut off by the watchdog is a timeout
        raise MediaFetchError(f"could not fetch {shorten_url(url)!r}: {type(exc).__name__}", url) from None
    finally:
        watchdog.close()
        if response is not None:
            response.close()  # its file holds the socket open otherwise
        if conn is not None:
            conn.close()
        sock.close()


def read_http_url(url: str, policy: MediaPolicy, deadline: Deadline) -> bytes:
    """The body behind an `http(s):` URL, redirects followed and checked hop by hop."""
    current = url
    for _hop in range(policy.media_max_redirects + 1):
        body, location = _one_request(current, policy, deadline)
        if body is not None:
            return body
        assert location is not None
        if urllib.parse.urlsplit(location).scheme not in ("http", "https"):
            raise MediaRefusedError(
                f"{shorten_url(url)!r} redirects to a non-http(s) URL {shorten_url(location)!r}", url
            )
        current = location
    raise MediaFetchError(f"{shorten_url(url)!r} redirects more than {policy.media_max_redirects} times", url)


def fetch_bytes(url: str, policy: MediaPolicy, deadline: Deadline | None = None) -> bytes:
    """The raw bytes behind a `data:`, `file:` or `http(s):` URL, under `policy`."""
    if deadline is None:
        deadline = Deadline(policy.media_timeout_s, url)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return read_data_url(url, policy)
    if scheme == "file":
        return read_file_url(url, policy)
    if scheme in ("http", "https"):
        return read_http_url(url, policy, deadline)
    raise MediaFetchError(
        f"unsupported URL scheme in {shorten_url(url)!r} (use data:, file: or http(s):)", url
    )
