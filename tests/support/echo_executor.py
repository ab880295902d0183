"""A tiny executor for task-manager tests: /health, POST /echo (optionally held open), GET /info."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--executor-id", required=True)
    p.add_argument("--ranks", default="")
    p.add_argument("--crash", action="store_true", help="exit at once, as a broken executor would")
    args = p.parse_args()
    if args.crash:
        print(f"echo executor {args.executor_id}: refusing to start (crash requested)", file=sys.stderr)
        sys.exit(3)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(float(body.get("hold_s", 0.0)))
        return web.json_response({"text": body["text"], "executor_id": args.executor_id})

    async def info(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "executor_id": args.executor_id,
                "pid": os.getpid(),
                "ranks": args.ranks,
                "nats_url": os.environ.get("CORNSERVE_NATS_URL"),
                "label": os.environ.get("ECHO_LABEL"),
            }
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/echo", echo)
    app.router.add_get("/info", info)
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
