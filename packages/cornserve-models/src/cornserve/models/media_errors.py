"""The errors of loading a media item, each with the HTTP status an executor answers with.

Media URLs come from the network, so every message is written for the caller, and none of them may
tell the caller something about the executor's machine that it did not already know: a refused
`file:` path and a missing one read the same, and a refused address is refused before any
connection is made (so nothing says whether a port is open).
"""

from __future__ import annotations


def shorten_url(url: str, limit: int = 80) -> str:
    """A URL short enough for an error message (data: URLs are often megabytes)."""
    return url if len(url) <= limit else url[: limit - 3] + "..."


class MediaError(ValueError):
    """A media item could not be loaded; the message names the URL. `status`: the HTTP answer."""

    status = 400
    kind = "invalid_media"

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class MediaFetchError(MediaError):
    """The bytes could not be fetched: unreachable URL, malformed data: URL, refused or unreadable."""

    kind = "media_fetch_error"


class MediaRefusedError(MediaFetchError):
    """The media policy refuses the URL: a path outside the media dirs, a private address, a scheme."""

    kind = "media_refused"


class MediaTimeoutError(MediaFetchError):
    """Fetching (and decoding) the item did not finish within the media deadline."""

    kind = "media_timeout"


class MediaTooLargeError(MediaError):
    """The item is over a cap of the policy: bytes, pixels, video frames, resolution or duration."""

    status = 413
    kind = "media_too_large"


class MediaDecodeError(MediaError):
    """The bytes were fetched but are not a decodable image/video."""

    kind = "media_decode_error"


class MediaBusyError(MediaError):
    """The media pool is full: too many items are being fetched already; retry later."""

    status = 503
    kind = "media_busy"
