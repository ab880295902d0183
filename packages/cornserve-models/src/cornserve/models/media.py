"""Fetch and decode the media items of a request (`data:`, `file:` and `http(s):` URLs).

Shared by Eric (encoder fission) and the LLM executor (no fission) so both see the same pixels.
Everything happens under a `MediaPolicy` (`cornserve.models.media_policy`): where media may come
from, how many bytes, pixels, frames and seconds an item may have, and one deadline for fetching and
decoding it. This is blocking code: servers run it on the media pool (`cornserve.models.media_pool`)
so it can never hold up their compute thread. Every failure is a `MediaError` naming the (truncated)
URL with the HTTP `status` to answer (400 refused/undecodable/late, 413 too large).

Images are checked against `media_max_pixels` from their header, before any pixel is decoded.
Videos are checked against `media_video_max_pixels` and `media_video_max_duration_s` from the stream
metadata before decoding, then decoded one frame at a time, keeping at most
`media_video_max_frames` (never the whole video in memory).
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Literal, overload

import av
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from cornserve.models.media_errors import (
    MediaBusyError,
    MediaDecodeError,
    MediaError,
    MediaFetchError,
    MediaRefusedError,
    MediaTimeoutError,
    MediaTooLargeError,
    shorten_url,
)
from cornserve.models.media_fetch import Deadline, fetch_bytes
from cornserve.models.media_policy import MediaPolicy

__all__ = [
    "MediaBusyError",
    "MediaDecodeError",
    "MediaError",
    "MediaFetchError",
    "MediaPolicy",
    "MediaRefusedError",
    "MediaTimeoutError",
    "MediaTooLargeError",
    "VideoArray",
    "decode_image",
    "decode_video",
    "fetch_bytes",
    "load_media",
    "shorten_url",
]

VideoArray = npt.NDArray[np.uint8]

_DEFAULT_POLICY = MediaPolicy()


def decode_image(data: bytes, url: str, policy: MediaPolicy = _DEFAULT_POLICY) -> Image.Image:
    """Decode image bytes to an RGB PIL image (fully loaded, so truncated files fail here).

    The size comes from the header (`Image.open` decodes nothing) and is checked first.
    """
    limit = policy.media_max_pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > limit:
                raise MediaTooLargeError(
                    f"{shorten_url(url)!r}: the image is {width}x{height} pixels; the limit is "
                    f"{limit} pixels",
                    url,
                )
            img.load()
            return img.convert("RGB")
    except MediaError:
        raise
    except UnidentifiedImageError as exc:
        raise MediaDecodeError(
            f"{shorten_url(url)!r} is not a decodable image (unrecognized format)", url
        ) from exc
    except Image.DecompressionBombError as exc:  # over twice PIL's own limit, even if the policy allows more
        raise MediaTooLargeError(f"{shorten_url(url)!r}: the image is too large: {exc}", url) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaDecodeError(f"{shorten_url(url)!r} is not a decodable image: {exc}", url) from exc


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(Fraction(container.duration, av.time_base))
    return None


def _check_video_header(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, url: str, policy: MediaPolicy
) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > policy.media_video_max_pixels:
        raise MediaTooLargeError(
            f"{shorten_url(url)!r}: the video is {width}x{height} pixels a frame; the limit is "
            f"{policy.media_video_max_pixels} pixels",
            url,
        )
    duration = _duration_s(container, stream)
    if duration is not None and duration > policy.media_video_max_duration_s:
        raise MediaTooLargeError(
            f"{shorten_url(url)!r}: the video is {duration:.1f}s long; the limit is "
            f"{policy.media_video_max_duration_s:g}s",
            url,
        )


class _FrameSampler:
    """Keeps at most `limit` frames, spread evenly, without holding more than that at any time.

    With a known frame count the kept indices are exactly `linspace(0, count - 1, limit)` (as when the
    whole video was decoded first); without one, every `stride`-th frame is kept and the stride doubles
    (dropping every other kept frame) whenever the buffer would overflow.
    """

    def __init__(self, limit: int, count: int | None) -> None:
        self.limit = limit
        self.targets: set[int] | None = None
        if count is not None and count > limit:
            self.targets = {int(i) for i in np.linspace(0, count - 1, limit).round().astype(int)}
        self.stride = 1
        self.kept: list[tuple[int, npt.NDArray[np.uint8]]] = []

    def wants(self, index: int) -> bool:
        """Whether frame `index` is to be converted to pixels and kept."""
        if self.targets is not None:
            return index in self.targets
        return index % self.stride == 0

    def add(self, index: int, frame: npt.NDArray[np.uint8]) -> None:
        """Keep frame `index` (one `wants` said yes to)."""
        self.kept.append((index, frame))
        if self.targets is None and len(self.kept) > self.limit:
            self.stride *= 2
            self.kept = [(i, f) for i, f in self.kept if i % self.stride == 0]

    def frames(self) -> list[npt.NDArray[np.uint8]]:
        """The kept frames, in order."""
        return [frame for _, frame in self.kept]


def decode_video(
    data: bytes, url: str, policy: MediaPolicy = _DEFAULT_POLICY, deadline: Deadline | None = None
) -> VideoArray:
    """Decode video bytes to RGB frames `[T, H, W, 3]` uint8, at most `media_video_max_frames` of them."""
    if deadline is None:
        deadline = Deadline(policy.media_timeout_s, url)
    max_duration = policy.media_video_max_duration_s
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaDecodeError(f"{shorten_url(url)!r} has no video stream", url)
            stream = container.streams.video[0]
            _check_video_header(container, stream, url, policy)
            sampler = _FrameSampler(policy.media_video_max_frames, stream.frames or None)
            for index, frame in enumerate(container.decode(stream)):
                deadline.remaining()
                if frame.width * frame.height > policy.media_video_max_pixels:
                    raise MediaTooLargeError(
                        f"{shorten_url(url)!r}: a frame is {frame.width}x{frame.height} pixels; the limit "
                        f"is {policy.media_video_max_pixels} pixels",
                        url,
                    )
                if frame.time is not None and frame.time > max_duration:
                    raise MediaTooLargeError(
                        f"{shorten_url(url)!r}: the video is over {max_duration:g}s long; the limit is "
                        f"{max_duration:g}s",
                        url,
                    )
                if sampler.wants(index):
                    sampler.add(index, np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8))
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaDecodeError(f"{shorten_url(url)!r} is not a decodable video: {exc}", url) from exc
    frames = sampler.frames()
    if not frames:
        raise MediaDecodeError(f"{shorten_url(url)!r} has no video frames", url)
    return np.stack(frames).astype(np.uint8, copy=False)


@overload
def load_media(
    url: str, modality: Literal["image"], policy: MediaPolicy | None = None, *, timeout_s: float | None = None
) -> Image.Image: ...
@overload
def load_media(
    url: str, modality: Literal["video"], policy: MediaPolicy | None = None, *, timeout_s: float | None = None
) -> VideoArray: ...
@overload
def load_media(
    url: str, modality: str, policy: MediaPolicy | None = None, *, timeout_s: float | None = None
) -> Image.Image | VideoArray: ...
def load_media(
    url: str, modality: str, policy: MediaPolicy | None = None, *, timeout_s: float | None = None
) -> Image.Image | VideoArray:
    """Fetch and decode one media item: an RGB PIL image, or video frames `[T, H, W, 3]` uint8.

    `policy` defaults to `MediaPolicy()` (no `file:`, public addresses only); `timeout_s` overrides
    its `media_timeout_s`, the one deadline for fetching and decoding. Raises `MediaError`s.
    """
    policy = policy or _DEFAULT_POLICY
    if modality not in ("image", "video"):
        raise MediaError(
            f"cannot load {modality!r} media from {shorten_url(url)!r}: only image and video", url
        )
    deadline = Deadline(timeout_s if timeout_s is not None else policy.media_timeout_s, url)
    data = fetch_bytes(url, policy, deadline)
    deadline.remaining()
    if modality == "image":
        return decode_image(data, url, policy)
    return decode_video(data, url, policy, deadline)
