"""Which Cornserve services are up, using the NATS micro discovery protocol ($SRV.PING)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from nats.aio.client import Client

from cornserve.bus.control import DISPATCHER_SERVICE_NAME, RM_SERVICE_NAME, TM_SERVICE_NAME

WATCHED = (RM_SERVICE_NAME, DISPATCHER_SERVICE_NAME, TM_SERVICE_NAME, "cornserve-sidecar")


async def ping_services(nc: Client, window_s: float = 0.3) -> dict[str, list[dict[str, Any]]]:
    """Ping every micro service once and collect the replies that arrive within `window_s`."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            replies.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish("$SRV.PING", b"", reply=inbox)
        await nc.flush(timeout=int(window_s) + 1)
        await asyncio.sleep(window_s)
    finally:
        await sub.unsubscribe()
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in WATCHED}
    for reply in replies:
        found.setdefault(str(reply.get("name")), []).append(reply)
    return found
