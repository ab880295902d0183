"""Keepalives of one graph: how its caller learns, within seconds, that this replica died.

A SIGKILLed replica sends no error reply, so without keepalives its caller would wait for the
graph's whole deadline. The replica publishes `InvokeKeepalive` seq 0 as soon as it takes the
graph (the acknowledgement, with its replica id), then one every interval, until the reply and
any relayed stream are done. The caller fails (or retries) the graph when they stop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client

from cornserve.bus.control import InvokeKeepalive

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Keepalive:
    """Publishes keepalives for one graph while anyone holds it (the handler, then the stream relay)."""

    nc: Client
    subject: str | None
    """Where the caller listens; None when it asked for no keepalives."""
    request_id: str
    replica_id: str
    interval_s: float
    _holds: int = field(default=1, init=False)
    _seq: int = field(default=0, init=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False)
    """The next keepalive's timer: a timer rather than a sleeping task per graph, since most graphs
    end before their first interval (a task each was measurable in the dispatcher's CPU per graph)."""
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    """A keepalive being published (started by the timer)."""
    _stopped: bool = field(default=False, init=False)

    async def start(self) -> None:
        """Acknowledge the graph (seq 0) and keep publishing in the background."""
        if self.subject is None:
            return
        await self._publish()
        self._arm()

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
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _arm(self) -> None:
        if not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._stopped:
            self._task = asyncio.create_task(self._publish_and_arm(), name=f"keepalive-{self.request_id}")

    async def _publish_and_arm(self) -> None:
        await self._publish()
        self._arm()

    async def _publish(self) -> None:
        assert self.subject is not None
        message = InvokeKeepalive(request_id=self.request_id, replica_id=self.replica_id, seq=self._seq)
        self._seq += 1
        try:
            await self.nc.publish(self.subject, message.model_dump_json().encode())
        except nats.errors.Error as exc:  # reconnecting or closing: the caller's deadline still holds
            logger.debug("keepalive on %s not sent: %s", self.subject, exc)
