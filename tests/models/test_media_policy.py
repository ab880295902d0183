"""The media policy against the attacks it exists for, with real files, sockets and servers.

- `file:` outside the media dirs (or missing, or a symlink/`..` out of them) reads the same: no oracle.
- A loopback/private URL is refused before any connection: a listening socket counts zero accepts.
- A redirect from an allowed server to a private address is refused without connecting there.
- A 1 byte/s server, a 20000x20000 PNG and a long video fail within the deadline + 1 s, in bounded memory.
- The media pool admits a bounded number of items and answers busy past that.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from cornserve.models import media_fetch
from cornserve.models.media import (
    MediaBusyError,
    MediaError,
    MediaFetchError,
    MediaPolicy,
    MediaRefusedError,
    MediaTimeoutError,
    MediaTooLargeError,
    load_media,
)
from cornserve.models.media_errors import shorten_url
from cornserve.models.media_policy import public_address
from cornserve.models.media_pool import MediaPool
from cornserve.runtime.process import free_port

LOOPBACK_OK = MediaPolicy(media_allow_hosts="127.0.0.1")
"""Tests that must fetch from their own local servers allow-list loopback explicitly."""


def png_bytes(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color=(1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (the body is a few compressed zero rows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * 64) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def mp4_bytes(frames: int, rate: int = 1, size: int = 16, fmt: str = "mp4") -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.full((size, size, 3), (i * 7) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def same_text(errors: list[MediaError]) -> set[str]:
    """The messages with each one's own URL cut out: what a caller learns beyond what it sent."""
    return {str(err).replace(repr(shorten_url(err.url)), "<url>") for err in errors}


def refusal(url: str, policy: MediaPolicy, modality: str = "image") -> MediaError:
    with pytest.raises(MediaError) as info:
        load_media(url, modality, policy)
    return info.value


# ---------------------------------------------------------------------------------------- file:


def test_file_refusals_are_one_message_whether_or_not_the_path_exists(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "ok.png").write_bytes(png_bytes())
    (media / "sub").mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (media / "link-out.png").symlink_to(tmp_path / "secret.png")
    (media / "link-passwd").symlink_to("/etc/passwd")
    os.mkfifo(media / "fifo")
    policy = MediaPolicy(media_dirs=str(media))

    assert load_media((media / "ok.png").as_uri(), "image", policy).size == (8, 6)
    refused_urls = [
        "file:///etc/passwd",
        "file:///nonexistent/cornserve.png",
        (media / "missing.png").as_uri(),  # inside the media dir, missing
        f"file://{media}/../secret.png",  # `..` out of it, to a file that exists
        (media / "link-out.png").as_uri(),  # a symlink out of it
        (media / "link-passwd").as_uri(),
        (media / "sub").as_uri(),  # a directory
        (media / "fifo").as_uri(),  # not a regular file (and must not block)
        f"file://otherhost{media}/ok.png",
    ]
    errors = [refusal(url, policy) for url in refused_urls]
    assert all(type(err) is MediaRefusedError and err.status == 400 for err in errors), errors
    assert same_text(errors) == {"<url> is not in an allowed media directory or cannot be read"}

    # With no media dirs file: is off, and says how to turn it on, the same way for every path.
    off = [refusal(url, MediaPolicy()) for url in ("file:///etc/passwd", "file:///nonexistent/x.png")]
    assert len(same_text(off)) == 1
    assert "CORNSERVE_MEDIA_DIRS" in str(off[0])


def test_media_dirs_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        MediaPolicy(media_dirs="/srv/media,relative/dir")


# ---------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("2002:a00:1::", False),  # 6to4 wrapping 10.0.0.1
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_public_address(address: str, public: bool) -> None:
    assert public_address(ipaddress.ip_address(address)) is public


@contextmanager
def listener() -> Iterator[tuple[int, Callable[[], int]]]:
    """A raw listening socket on loopback and a function counting the connections it got."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)

    def accepts() -> int:
        count = 0
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    try:
        yield sock.getsockname()[1], accepts
    finally:
        sock.close()


def test_loopback_is_refused_before_any_connection_and_reads_like_a_closed_port() -> None:
    policy = MediaPolicy()
    with listener() as (port, accepts):
        open_port = [
            refusal(url, policy)
            for url in (
                f"http://127.0.0.1:{port}/x.png",
                f"http://localhost:{port}/x.png",
                f"http://[::ffff:127.0.0.1]:{port}/x.png",
                f"https://127.0.0.1:{port}/x.png",
            )
        ]
        closed_port = refusal(f"http://127.0.0.1:{free_port()}/x.png", policy)
        time.sleep(0.2)  # a connect that had happened would be in the backlog by now
        assert accepts() == 0
    assert all(type(err) is MediaRefusedError for err in [*open_port, closed_port])
    assert same_text([*open_port, closed_port]) == {
        "<url> refused: the address is not allowed (loopback, private, link-local and multicast "
        "addresses need CORNSERVE_MEDIA_ALLOW_HOSTS)"
    }
    # The allow-list is what lets it through (so the zero above is the policy's doing).
    with listener() as (port, accepts):
        with pytest.raises(MediaError):
            load_media(f"http://127.0.0.1:{port}/x.png", "image", LOOPBACK_OK, timeout_s=1)
        assert accepts() == 1


@contextmanager
def http_server(routes: dict[str, Callable[[BaseHTTPRequestHandler], None]]) -> Iterator[str]:
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            routes.get(self.path, lambda h: h.send_error(404))(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def redirect_to(location: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return answer


def serve(body: bytes, length: int | None = None) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.end_headers()
        h.wfile.write(body)

    return answer


@pytest.fixture
def loopback_only_connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every connection the fetcher opens; one to a non-loopback address fails the test."""
    seen: list[str] = []
    real = socket.create_connection

    def checked(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.append(address[0])
        assert ipaddress.ip_address(address[0]).is_loopback, f"the fetcher connected to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(media_fetch.socket, "create_connection", checked)
    return seen


def test_redirects_are_checked_hop_by_hop_and_capped(loopback_only_connects: list[str]) -> None:
    png = png_bytes()
    routes = {
        "/img.png": serve(png),
        "/to-img": redirect_to("/img.png"),
        "/to-10": redirect_to("http://10.0.0.1/x.png"),
        "/to-192": redirect_to("http://192.168.7.7:8080/x.png"),
        "/to-metadata": redirect_to("http://169.254.169.254/latest/meta-data/"),
        "/to-file": redirect_to("file:///etc/passwd"),
        "/loop": redirect_to("/loop"),
    }
    with http_server(routes) as base:
        assert load_media(f"{base}/to-img", "image", LOOPBACK_OK).size == (8, 6)
        for path in ("/to-10", "/to-192", "/to-metadata", "/to-file"):
            err = refusal(f"{base}{path}", LOOPBACK_OK)
            assert type(err) is MediaRefusedError, (path, err)
        err = refusal(f"{base}/loop", LOOPBACK_OK)
        assert type(err) is MediaFetchError and "more than 3 times" in str(err)
    assert loopback_only_connects and set(loopback_only_connects) == {"127.0.0.1"}


def test_byte_cap_on_http_and_data_urls() -> None:
    policy = MediaPolicy(media_allow_hosts="127.0.0.1", media_max_bytes=1000)
    big = b"x" * 5000

    def no_length(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(big)

    with http_server({"/declared": serve(big), "/undeclared": no_length, "/lying": serve(big, 10)}) as base:
        for path in ("/declared", "/undeclared"):
            err = refusal(f"{base}{path}", policy)
            assert type(err) is MediaTooLargeError and err.status == 413, (path, err)
        assert type(refusal(f"{base}/lying", policy)) is not MediaTooLargeError  # read only 10 bytes
    data = "data:image/png;base64," + base64.b64encode(big).decode()
    assert type(refusal(data, policy)) is MediaTooLargeError


# ---------------------------------------------------------------------------------------- slow senders


@contextmanager
def drip_server(preamble: bytes, drip: bytes) -> Iterator[str]:
    """Sends `preamble` at once, then `drip` one byte a second, to every connection."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(0.2)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.sendall(preamble)
                    for byte in drip:
                        if stop.wait(1.0):
                            break
                        conn.sendall(bytes([byte]))
                except OSError:
                    continue

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/slow.png"
    finally:
        stop.set()
        thread.join(timeout=10)
        sock.close()


@pytest.mark.parametrize(
    ("preamble", "drip"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 100),  # the body drips
        (b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),  # the headers drip
    ],
    ids=["body", "headers"],
)
def test_a_one_byte_a_second_server_fails_at_the_deadline(preamble: bytes, drip: bytes) -> None:
    policy = MediaPolicy(media_allow_hosts="127.0.0.1", media_timeout_s=2.0)
    with drip_server(preamble, drip) as url:
        start = time.monotonic()
        err = refusal(url, policy)
        elapsed = time.monotonic() - start
    assert type(err) is MediaTimeoutError and 400 <= err.status < 500, err
    assert elapsed < policy.media_timeout_s + 1.0, elapsed


# ---------------------------------------------------------------------------------------- decode caps


LOAD_IN_A_FRESH_PROCESS = """
import json, resource, sys, time
from cornserve.models.media import MediaError, MediaPolicy, load_media
url, modality, policy = sys.argv[1], sys.argv[2], MediaPolicy.model_validate_json(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
try:
    load_media(url, modality, policy)
    error = None
except MediaError as exc:
    error = [type(exc).__name__, exc.status, str(exc)]
elapsed = time.monotonic() - start
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "elapsed": elapsed, "growth_mib": growth_kib / 1024}))
"""


def load_measured(url: str, modality: str, policy: MediaPolicy) -> dict[str, Any]:
    """Load in a fresh process: its error, seconds taken and peak-RSS growth (C allocations included)."""
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, url, modality, policy.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_a_20000x20000_png_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = png_claiming(20000, 20000)
    assert len(bomb) < 1000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    policy = MediaPolicy(media_dirs=str(tmp_path), media_timeout_s=5.0)
    # Over the policy's cap; and with a cap above PIL's own bomb limit, PIL's refusal maps the same way.
    for p in (policy, policy.model_copy(update={"media_max_pixels": 10**9})):
        result = load_measured(path.as_uri(), "image", p)
        assert result["error"] is not None and result["error"][:2] == ["MediaTooLargeError", 413], result
        assert result["elapsed"] < p.media_timeout_s + 1.0, result
        assert result["growth_mib"] < 50, result  # decoding it would take 1.2 GB
    assert "20000x20000" in str(refusal(path.as_uri(), policy))
    with http_server({"/bomb.png": serve(bomb)}) as base:
        assert type(refusal(f"{base}/bomb.png", LOOPBACK_OK)) is MediaTooLargeError


def test_a_long_video_fails_within_the_deadline_in_bounded_memory(tmp_path: Path) -> None:
    policy = MediaPolicy(media_dirs=str(tmp_path), media_timeout_s=3.0, media_video_max_duration_s=60.0)
    path = tmp_path / "long.mp4"
    path.write_bytes(mp4_bytes(frames=200, rate=1))  # 200 s of 16x16 video
    result = load_measured(path.as_uri(), "video", policy)
    assert result["error"] is not None and result["error"][:2] == ["MediaTooLargeError", 413], result
    assert "200.0s long" in result["error"][2], result
    assert result["elapsed"] < policy.media_timeout_s + 1.0, result
    assert result["growth_mib"] < 50, result
    # Over the resolution cap: refused from the stream header.
    path.write_bytes(mp4_bytes(frames=2, size=64))
    err = refusal(path.as_uri(), policy.model_copy(update={"media_video_max_pixels": 32 * 32}), "video")
    assert type(err) is MediaTooLargeError and "64x64" in str(err), err


def test_video_frames_are_sampled_while_decoding(tmp_path: Path) -> None:
    policy = MediaPolicy(media_dirs=str(tmp_path), media_video_max_frames=8)
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes(frames=100, rate=25))
    video = load_media(path.as_uri(), "video", policy)
    assert video.shape == (8, 16, 16, 3)
    expected = np.linspace(0, 99, 8).round().astype(int)  # the frames a decode-everything would keep
    assert np.allclose(video[:, 0, 0, 0].astype(int), (expected * 7) % 256, atol=6)
    # A container that does not record its frame count: sampled as it goes, still at most 8 frames.
    path.write_bytes(mp4_bytes(frames=100, rate=25, fmt="m4v"))
    assert load_media(path.as_uri(), "video", policy).shape[0] <= 8


# ---------------------------------------------------------------------------------------- the pool


async def test_the_media_pool_is_bounded_and_answers_busy() -> None:
    policy = MediaPolicy(media_allow_hosts="127.0.0.1", media_timeout_s=2.0, media_workers=1, media_queue=1)
    pool = MediaPool(policy)
    try:
        with drip_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 100) as url:
            first = asyncio.ensure_future(pool.load(url, "image"))
            second = asyncio.ensure_future(pool.load(url, "image"))
            await asyncio.sleep(0.1)
            assert pool.admitted == 2
            with pytest.raises(MediaBusyError) as info:
                await pool.load(url, "image")
            assert info.value.status == 503
            start = time.monotonic()
            results = await asyncio.gather(first, second, return_exceptions=True)
            # The queued item's deadline started when it was submitted: both end by the deadline.
            assert time.monotonic() - start < policy.media_timeout_s + 1.0
            assert all(isinstance(r, MediaTimeoutError) for r in results), results
        assert pool.admitted == 0
        image = await pool.load("data:image/png;base64," + base64.b64encode(png_bytes()).decode(), "image")
        assert image.size == (8, 6)
    finally:
        pool.close()
