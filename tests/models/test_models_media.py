"""load_media: data:/file:/http: URLs to RGB images and [T, H, W, 3] uint8 videos, with typed errors.

The attack-shaped cases of the media policy are in test_media_policy.py.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from cornserve.models.loading import ModelNotFoundError, resolve_model_dir
from cornserve.models.media import MediaDecodeError, MediaError, MediaFetchError, MediaPolicy, load_media
from cornserve.runtime.process import free_port


def png_bytes(size: tuple[int, int] = (40, 30), mode: str = "RGBA") -> bytes:
    img = Image.new(mode, size, color=(10, 200, 30, 255) if mode == "RGBA" else 7)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(frames: int = 5, size: int = 32) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.full((size, size, 3), i * 40, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def http_server() -> Iterator[str]:
    body = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_image_from_data_file_and_http(tmp_path: Path, http_server: str) -> None:
    path = tmp_path / "a b.png"
    path.write_bytes(png_bytes())
    policy = MediaPolicy(media_dirs=str(tmp_path), media_allow_hosts="127.0.0.1")
    for url in (data_url(png_bytes(), "image/png"), path.as_uri(), f"{http_server}/img.png"):
        img = load_media(url, "image", policy)
        assert isinstance(img, Image.Image)
        assert img.mode == "RGB" and img.size == (40, 30)


def test_video_from_data_url() -> None:
    video = load_media(data_url(mp4_bytes(), "video/mp4"), "video")
    assert video.dtype == np.uint8 and video.shape == (5, 32, 32, 3)


def test_missing_file_and_unreachable_url_are_fetch_errors(tmp_path: Path, http_server: str) -> None:
    policy = MediaPolicy(media_dirs=str(tmp_path), media_allow_hosts="127.0.0.1")
    with pytest.raises(MediaFetchError, match=r"nope\.png"):
        load_media((tmp_path / "nope.png").as_uri(), "image", policy)
    with pytest.raises(MediaFetchError, match="404"):
        load_media(f"{http_server}/missing.png", "image", policy)
    port = free_port()  # nobody listens there (an allow-listed address may say it could not connect)
    with pytest.raises(MediaFetchError, match=f"127.0.0.1:{port}.*cannot connect"):
        load_media(f"http://127.0.0.1:{port}/x.png", "image", policy, timeout_s=5)
    with pytest.raises(MediaFetchError, match="base64"):
        load_media("data:image/png;base64,@@@", "image")


def test_undecodable_bytes_are_decode_errors_with_short_url() -> None:
    url = data_url(b"not an image at all" * 1000, "image/png")
    with pytest.raises(MediaDecodeError) as info:
        load_media(url, "image")
    assert "data:image/png;base64," in str(info.value)
    assert len(str(info.value)) < 400
    with pytest.raises(MediaDecodeError):
        load_media(data_url(b"\x00\x01garbage" * 500, "video/mp4"), "video")
    assert issubclass(MediaDecodeError, MediaError) and issubclass(MediaError, ValueError)


def test_unsupported_modality() -> None:
    with pytest.raises(MediaError, match="audio"):
        load_media(data_url(png_bytes(), "image/png"), "audio")


def test_resolve_model_dir(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        resolve_model_dir(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_dir(str(tmp_path / "m")) == (tmp_path / "m").resolve()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing"))
