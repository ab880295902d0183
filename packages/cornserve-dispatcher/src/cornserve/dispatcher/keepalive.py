"""Keepalives of one graph: how its caller learns, within seconds, that this replica died.

A SIGKILLed replica sends no error reply, so without keepalives its caller would wait for the
graph's whole deadline. The replica publishes `InvokeKeepalive` seq 0 once the graph has run for
`ack_delay_s` (the acknowledgement, with its replica id), then one every interval, until the reply
and any relayed stream are done. The caller fails (or retries) the graph when they stop.

Why the acknowledgement waits: most graphs reply within milliseconds, and an acknowledgement sent
at once was one more NATS message per graph (a socket write here, a route in nats-server, a wakeup
and a parse in the gateway, on the graph's critical path at concurrency 1). The caller's liveness
clock starts when it sends the graph, so a replica that dies before acknowledging is noticed just
as soon (after the caller's keepalive timeout, which is longer than the interval); only the error
then cannot name the replica. The delay is at most one interval.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import nats.errors
from nats.aio.client import Client

from cornserve.bus.control import InvokeKeepalive

logger = logging.getLogger(__name__)

ACK_DELAY_S = 0.1
"""The default `ack_delay_s`: longer than a short graph takes, even at concurrency 32 on two cores
(~30-60 ms), far shorter than a caller's keepalive timeout (6 s by default)."""


@dataclass(eq=False)
class Keepalive:
    """Publishes keepalives for one graph while anyone holds it (the handler, then the stream relay)."""

    nc: Client
    subject: str | None
    """Where the caller listens; None when it asked for no keepalives."""
    request_id: str
    replica_id: str
    interval_s: float
    ack_delay_s: float = ACK_DELAY_S
    """How long the graph runs before the acknowledgement (capped at `interval_s`); 0: at once."""
    _holds: int = field(default=1, init=False)
    _seq: int = field(default=0, init=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False)
    """The next keepalive's timer: a timer rather than a sleeping task per graph, since most graphs
    end before their first interval (a task each was measurable in the dispatcher's CPU per graph)."""
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    """A keepalive being published (started by the timer)."""
    _stopped: bool = field(default=False, init=False)

    async def start(self) -> None:
        """Start the keepalives: the acknowledgement (seq 0) after `ack_delay_s`, unless released first."""
        if self.subject is None:
            return
        delay = min(self.ack_delay_s, self.interval_s)
        if delay <= 0:
            await self._publish()
            delay = self.interval_s
        self._arm(delay)

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

    def _arm(self, delay_s: float | None = None) -> None:
        if not self._stopped:
            delay = self.interval_s if delay_s is None else delay_s
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

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
