"""Keepalives of one graph: how its caller learns, within seconds, that this replica died.

A SIGKILLed replica sends no error reply, so without keepalives its caller would wait for the
graph's whole deadline. The replica publishes `InvokeKeepalive` seq 0 as soon as it takes the
graph (the acknowledgement, with its replica id), then one every interval, until the reply and
any relayed stream are done. The caller fails (or retries) the graph when they stop.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.client import Client

from cornserve.bus.control import InvokeKeepalive

logger = logging.getLogger(__name__)


class Keepalive:
    """Publishes keepalives for one graph while anyone holds it (the handler, then the stream relay)."""

    def __init__(
        self, nc: Client, subject: str | None, request_id: str, replica_id: str, interval_s: float
    ) -> None:
        self._nc = nc
        self._subject = subject
        self._request_id = request_id
        self._replica_id = replica_id
        self._interval_s = interval_s
        self._holds = 1
        self._seq = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Acknowledge the graph (seq 0) and keep publishing in the background."""
        if self._subject is None:
            return
        await self._publish()
        self._task = asyncio.create_task(self._loop(), name=f"keepalive-{self._request_id}")

    def hold(self) -> None:
        """One more user (a stream relay outliving the handler) keeps the keepalives going."""
        self._holds += 1

    def release(self) -> None:
        """One user is done; the last one stops the keepalives (idempotent past zero)."""
        self._holds -= 1
        if self._holds <= 0:
            self.cancel()

    @property
    def stopped(self) -> bool:
        """Whether nobody holds it any more."""
        return self._holds <= 0

    def cancel(self) -> None:
        """Stop publishing now (shutdown)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self._publish()

    async def _publish(self) -> None:
        assert self._subject is not None
        message = InvokeKeepalive(request_id=self._request_id, replica_id=self._replica_id, seq=self._seq)
        self._seq += 1
        try:
            await self._nc.publish(self._subject, message.model_dump_json().encode())
        except nats.errors.Error as exc:  # reconnecting or closing: the caller's deadline still holds
            logger.debug("keepalive on %s not sent: %s", self._subject, exc)
