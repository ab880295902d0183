"""A stand-in for the `vllm` executable: `--version` and `serve MODEL --host H --port P ...`.

It plays the vLLM release in FAKE_VLLM_VERSION (default 0.33.0) and refuses what that release's
chat server refuses, with the same status and message (read in vLLM's released sources:
`entrypoints/chat_utils.py`, from 0.33 `renderers/chat_utils/item_tracker.py`, and the error
mapping in `entrypoints/serve/exception_handling/error_response.py`):

- an embedding part without `--enable-mm-embeds`: 400 "You must set `--enable-mm-embeds` ...";
- more items of a modality than `--limit-mm-per-prompt` allows: 400 "At most N ..."; from 0.16,
  embeddings pass a zero limit when `--enable-mm-embeds` is set;
- raw media and embeddings of one modality in one request: 400 "Mixing raw ...";
- plain and grid-carrying (dict) embeddings of one modality: from 0.15 `NotImplementedError`,
  which 0.33 answers with 501;
- dict embeddings with different keys: 400; a `video_embeds` part before 0.29: 400.

Every accepted request streams back one chunk describing what it decoded (shape, sum, dtype,
storage bytes, grid) and its command line, so a test sees exactly what reached "vLLM".
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
from typing import Any

import torch
from aiohttp import web

RAW = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio"}
ARGS: web.AppKey[argparse.Namespace] = web.AppKey("args")


def version() -> tuple[int, ...]:
    return tuple(int(x) for x in os.environ.get("FAKE_VLLM_VERSION", "0.33.0").split("."))


class Rejected(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _load(b64: str) -> torch.Tensor:
    tensor = torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True)
    assert isinstance(tensor, torch.Tensor)
    return tensor


def _describe(value: Any) -> dict[str, Any]:
    grid = None
    if isinstance(value, dict):
        grid = value["image_grid_thw"].tolist()
        value = value["image_embeds"]
    return {
        "shape": list(value.shape),
        "sum": float(value.float().sum()),
        "dtype": str(value.dtype).removeprefix("torch."),
        "storage_bytes": value.untyped_storage().nbytes(),
        "nbytes": value.numel() * value.element_size(),
        "grid_thw": grid,
    }


def check(body: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Parse the media parts as vLLM does; Rejected for what it refuses; one entry per embedding."""
    limits: dict[str, int] = json.loads(args.limit_mm_per_prompt) if args.limit_mm_per_prompt else {}
    items: dict[str, list[Any]] = {}
    for message in body["messages"]:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type")
            if kind == "text":
                continue
            if kind in RAW:
                key = modality = RAW[kind]
                items.setdefault(key, []).append(None)
            elif kind in ("image_embeds", "audio_embeds") or (
                kind == "video_embeds" and version() >= (0, 29)
            ):
                if not args.enable_mm_embeds:
                    raise Rejected(
                        400, "BadRequestError", f"You must set `--enable-mm-embeds` to input `{kind}`"
                    )
                value = part[kind]
                value = {k: _load(v) for k, v in value.items()} if isinstance(value, dict) else _load(value)
                key, modality = kind, kind.removesuffix("_embeds")
                items.setdefault(key, []).append(value)
            else:
                raise Rejected(400, "BadRequestError", f"Unknown part type: {kind}")
            limit = limits.get(modality, 999)
            bypass = (
                args.enable_mm_embeds and limit == 0 and kind.endswith("_embeds") and version() >= (0, 16)
            )
            count = len(items[key])
            if not bypass and count > limit:
                raise Rejected(
                    400, "BadRequestError", f"At most {limit} {modality}(s) may be provided in one prompt."
                )
    seen = []
    for modality in ("image", "audio", "video"):
        if modality in items and f"{modality}_embeds" in items:
            raise Rejected(
                400, "BadRequestError", f"Mixing raw {modality} and embedding inputs is not allowed"
            )
        embeds = items.get(f"{modality}_embeds", [])
        dicts = [e for e in embeds if isinstance(e, dict)]
        if dicts and len(dicts) != len(embeds):
            if version() >= (0, 15):
                raise Rejected(501, "NotImplementedError", str(type(embeds)))
            raise Rejected(400, "BadRequestError", "mixed embedding forms")
        if dicts and any(set(d) != set(dicts[0]) for d in dicts):
            raise Rejected(
                400, "BadRequestError", "All dictionaries in the list of embeddings must have the same keys."
            )
        seen += [{"modality": modality, **_describe(e)} for e in embeds]
    return seen


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if "cornserve_embeddings" in body:
        return web.json_response({"error": {"message": "unexpected field cornserve_embeddings"}}, status=400)
    try:
        embeds = check(body, request.app[ARGS])
    except Rejected as exc:
        error = {"message": exc.message, "type": exc.kind, "param": None, "code": exc.status}
        return web.json_response({"error": error}, status=exc.status)
    report = {"embeds": embeds, "flags": sys.argv[1:]}
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body.get("model", ""),
        "choices": [{"index": 0, "delta": {"content": json.dumps(report)}, "finish_reason": "stop"}],
    }
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        print(os.environ.get("FAKE_VLLM_VERSION", "0.33.0"))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("verb", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--enable-mm-embeds", action="store_true")
    parser.add_argument("--limit-mm-per-prompt", default=None)
    args, _ = parser.parse_known_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ARGS] = args
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
