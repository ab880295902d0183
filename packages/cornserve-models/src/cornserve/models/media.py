"""Fetch and decode the media items of a request (`data:`, `file:` and `http(s):` URLs).

Shared by Eric (encoder fission) and the LLM executor (no fission) so both see the same pixels.
This is blocking code with a deadline: run it in a thread pool from async servers. Every failure
is a `MediaError` naming the (truncated) URL, so servers can answer 400 with a useful message.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Literal, overload

import av
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

MAX_MEDIA_BYTES = 256 * 1024 * 1024
"""Refuse media larger than this instead of exhausting memory."""

DEFAULT_MAX_FRAMES = 64
"""Longer videos are subsampled evenly to this many frames."""

_READ_BLOCK = 1 << 16

VideoArray = npt.NDArray[np.uint8]


class MediaError(ValueError):
    """A media item could not be loaded; the message names the URL."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class MediaFetchError(MediaError):
    """The bytes could not be fetched: unreachable URL, missing file, malformed data: URL, too large."""


class MediaDecodeError(MediaError):
    """The bytes were fetched but are not a decodable image/video."""


def shorten_url(url: str, limit: int = 80) -> str:
    """A URL short enough for an error message (data: URLs are often megabytes)."""
    return url if len(url) <= limit else url[: limit - 3] + "..."


def _read_data_url(url: str) -> bytes:
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise MediaFetchError(f"malformed data: URL (no comma) {shorten_url(url)!r}", url)
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaFetchError(f"data: URL {shorten_url(url)!r} has invalid base64: {exc}", url) from exc
    return urllib.parse.unquote_to_bytes(payload)


def _file_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaFetchError(f"file: URL {shorten_url(url)!r} names a remote host {parsed.netloc!r}", url)
    return Path(urllib.parse.unquote(parsed.path))


def _read_file_url(url: str) -> bytes:
    path = _file_path(url)
    try:
        size = path.stat().st_size
        if size > MAX_MEDIA_BYTES:
            raise MediaFetchError(f"{shorten_url(url)!r} is {size} bytes, over {MAX_MEDIA_BYTES}", url)
        return path.read_bytes()
    except OSError as exc:
        raise MediaFetchError(f"cannot read {shorten_url(url)!r}: {exc.strerror or exc}", url) from exc


def _read_http_url(url: str, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "cornserve-media/1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            chunks: list[bytes] = []
            total = 0
            while True:
                if time.monotonic() > deadline:
                    raise MediaFetchError(f"fetching {shorten_url(url)!r} took over {timeout_s:g}s", url)
                block = response.read(_READ_BLOCK)
                if not block:
                    return b"".join(chunks)
                total += len(block)
                if total > MAX_MEDIA_BYTES:
                    raise MediaFetchError(f"{shorten_url(url)!r} is over {MAX_MEDIA_BYTES} bytes", url)
                chunks.append(block)
    except urllib.error.HTTPError as exc:
        raise MediaFetchError(
            f"fetching {shorten_url(url)!r} failed: HTTP {exc.code} {exc.reason}", url
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MediaFetchError(f"cannot fetch {shorten_url(url)!r}: {reason}", url) from exc


def fetch_bytes(url: str, *, timeout_s: float = 30.0) -> bytes:
    """The raw bytes behind a `data:`, `file:` or `http(s):` URL."""
    if url.startswith("data:"):
        return _read_data_url(url)
    if url.startswith("file:"):
        return _read_file_url(url)
    if url.startswith(("http://", "https://")):
        return _read_http_url(url, timeout_s)
    raise MediaFetchError(
        f"unsupported URL scheme in {shorten_url(url)!r} (use data:, file: or http(s):)", url
    )


def decode_image(data: bytes, url: str) -> Image.Image:
    """Decode image bytes to an RGB PIL image (fully loaded, so truncated files fail here)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise MediaDecodeError(
            f"{shorten_url(url)!r} is not a decodable image (unrecognized format)", url
        ) from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaDecodeError(f"{shorten_url(url)!r} is not a decodable image: {exc}", url) from exc


def decode_video(data: bytes, url: str, *, max_frames: int = DEFAULT_MAX_FRAMES) -> VideoArray:
    """Decode video bytes to RGB frames `[T, H, W, 3]` uint8, evenly subsampled to `max_frames`."""
    frames: list[npt.NDArray[np.uint8]] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaDecodeError(f"{shorten_url(url)!r} has no video stream", url)
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                frames.append(np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8))
    except MediaDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaDecodeError(f"{shorten_url(url)!r} is not a decodable video: {exc}", url) from exc
    if not frames:
        raise MediaDecodeError(f"{shorten_url(url)!r} has no video frames", url)
    if len(frames) > max_frames:
        keep = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in keep]
    return np.stack(frames).astype(np.uint8, copy=False)


@overload
def load_media(url: str, modality: Literal["image"], *, timeout_s: float = 30.0) -> Image.Image: ...
@overload
def load_media(url: str, modality: Literal["video"], *, timeout_s: float = 30.0) -> VideoArray: ...
@overload
def load_media(url: str, modality: str, *, timeout_s: float = 30.0) -> Image.Image | VideoArray: ...
def load_media(url: str, modality: str, *, timeout_s: float = 30.0) -> Image.Image | VideoArray:
    """Fetch and decode one media item: an RGB PIL image, or video frames `[T, H, W, 3]` uint8.

    Raises MediaFetchError / MediaDecodeError (both MediaError, a ValueError); an unsupported
    modality is a plain MediaError.
    """
    if modality not in ("image", "video"):
        raise MediaError(
            f"cannot load {modality!r} media from {shorten_url(url)!r}: only image and video", url
        )
    data = fetch_bytes(url, timeout_s=timeout_s)
    if modality == "image":
        return decode_image(data, url)
    return decode_video(data, url)
