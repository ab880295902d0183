"""An executor for the payload-limit and deadline tests: POST /big answers `size` characters of text.

With `busy` it answers `429` with `Retry-After: 7`, as an executor whose bounded queue is full.
Every request it receives is appended to the file in $BIG_COUNT_FILE (one line per request), so a
test can tell whether (and how often) a graph reached an executor.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from aiohttp import web


def pattern(size: int) -> str:
    """`size` characters that change along the text (numbered lines), so a reordered or lost part shows."""
    return "".join(f"{i:07d}\n" for i in range(size // 8 + 1))[:size]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--executor-id", required=True)
    p.add_argument("--ranks", default="")
    args = p.parse_args()
    count_file = os.environ["BIG_COUNT_FILE"]

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def big(request: web.Request) -> web.Response:
        body = await request.json()
        with open(count_file, "a") as f:
            f.write(f"{len(body['text'])}\n")
        if body.get("busy"):  # stands for an executor whose bounded queue is full
            return web.json_response({"error": "queue full"}, status=429, headers={"Retry-After": "7"})
        await asyncio.sleep(float(body["hold_s"]))
        return web.json_response({"text": pattern(int(body["size"]))})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_post("/big", big)
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
