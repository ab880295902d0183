"""A stand-in for the `vllm` executable: `serve MODEL --host H --port P ...` answering like vLLM.

It decodes every `image_embeds` content part the way vLLM does (base64 `torch.save`) and streams
back one chunk describing what it received, so a test can check the tensors that reached "vLLM".
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from typing import Any

import torch
from aiohttp import web


def _load(b64: str) -> torch.Tensor:
    tensor = torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True)
    assert isinstance(tensor, torch.Tensor)
    return tensor


def describe(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per image_embeds part: shape, sum and grid."""
    seen = []
    for message in body["messages"]:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") != "image_embeds":
                continue
            value = part["image_embeds"]
            grid = None
            if isinstance(value, dict):
                grid = _load(value["image_grid_thw"]).tolist()
                value = value["image_embeds"]
            tensor = _load(value)
            seen.append({"shape": list(tensor.shape), "sum": float(tensor.sum()), "grid_thw": grid})
    return seen


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if "cornserve_embeddings" in body:
        return web.json_response({"error": {"message": "unexpected field cornserve_embeddings"}}, status=400)
    report = {"embeds": describe(body), "flags": sys.argv[1:]}
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
    parser = argparse.ArgumentParser()
    parser.add_argument("verb", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
