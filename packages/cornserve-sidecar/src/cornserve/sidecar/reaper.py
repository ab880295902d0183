"""Time-to-live reclamation: whatever nobody claimed within the TTL is freed, and said so in the log.

This is what keeps a crashed or forgetful executor from leaking the arena: unsent allocations,
chunks destinations never released, streams never closed and received chunks never consumed.
Destinations of expired chunks are told, so their receives fail with ``data_expired`` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from cornserve.bus.sidecar import Key, NoticeRequest
from cornserve.bus.subjects import SidecarVerb
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.dropping import DroppedIds
from cornserve.sidecar.holdings import Holdings
from cornserve.sidecar.identity import LossCounters, ServerIdentity
from cornserve.sidecar.inbox import Inbox
from cornserve.sidecar.outbox import Outbox
from cornserve.sidecar.peers import Peers
from cornserve.sidecar.tasks import BackgroundTasks

logger = logging.getLogger("cornserve.sidecar.server")

MAX_BACKOFF_S = 60.0
"""Longest pause between sweeps while they keep failing."""


@dataclass
class Reaper:
    """Periodic sweep over every part of the server that can hold memory or state."""

    me: ServerIdentity
    memory: ArenaMemory
    holdings: Holdings
    inbox: Inbox
    outbox: Outbox
    peers: Peers
    counters: LossCounters
    background: BackgroundTasks
    dropped: DroppedIds

    async def run_forever(self) -> None:
        """Sweep a few times per TTL (at most every 5 s) until cancelled; no failure stops it.

        A sweep that raised is logged with its traceback and the next one comes after a doubled
        pause (up to :data:`MAX_BACKOFF_S`), so a persistent fault neither kills reclamation nor
        floods the log; the first clean sweep restores the normal pace.
        """
        interval = min(5.0, max(0.05, self.me.ttl_s / 4))
        pause = interval
        while True:
            await asyncio.sleep(pause)
            failed = self.reap()
            pause = min(MAX_BACKOFF_S, max(interval, pause * 2)) if failed else interval

    def reap(self) -> int:
        """Free whatever nobody claimed within the TTL, and say so in the log; returns failed sweeps.

        Each kind of holding is swept on its own, so a fault in one (a corrupt entry) still lets the
        others be reclaimed.
        """
        cutoff = time.monotonic() - self.me.ttl_s
        failed = 0
        sweeps = (
            self._reap_unsent,
            self._reap_held,
            self._reap_streams,
            self._reap_received,
            self._reap_drops,
        )
        for sweep in sweeps:
            try:
                sweep(cutoff)
            except Exception:
                failed += 1
                logger.exception("rank %d: TTL sweep %s failed; continuing", self.me.rank, sweep.__name__)
        return failed

    def _unclaimed(self, what: str, id_: str, chunk: int, by: str = "") -> None:
        logger.warning(
            "rank %d: %s id %r chunk %d unclaimed%s for %.1fs; freeing",
            self.me.rank,
            what,
            id_,
            chunk,
            by,
            self.me.ttl_s,
        )

    def _reap_unsent(self, cutoff: float) -> None:
        for reservation in list(self.memory.unsent.values()):
            if reservation.created < cutoff:
                self.memory.give_back(reservation)  # forgets the entry before freeing its bytes
                logger.warning(
                    "rank %d: unsent allocation at %d expired after %.1fs",
                    self.me.rank,
                    reservation.offset,
                    self.me.ttl_s,
                )

    def _reap_held(self, cutoff: float) -> None:
        notices: dict[int, list[Key]] = {}
        held_by_key = self.holdings.held
        for key, held in list(held_by_key.items()):
            if held.created >= cutoff:
                continue
            if held.offset is None and not held.pending_local and not held.gpu:
                # Only a record that TCP destinations have not finished yet: no memory is involved.
                del held_by_key[key]
                if held.notify:
                    self.holdings.announce_released([key])
                continue
            self._unclaimed(
                "sent", key[0], key[1], f" by ranks {sorted(held.pending_local | held.pending_remote)}"
            )
            for r in held.pending_local:
                notices.setdefault(r, []).append(Key(id=key[0], chunk_id=key[1]))
            del held_by_key[key]  # first: an entry whose free fails is not retried at every sweep
            if held.offset is not None:
                self.memory.free(held.offset)
            if held.announces:
                self.holdings.announce_released([key])
            self.counters.expired_total += 1
        for rank, keys in notices.items():
            note = NoticeRequest(
                kind="expired",
                keys=keys,
                source_rank=self.me.rank,
                reason=f"unclaimed for {self.me.ttl_s}s",
            )
            if rank == self.me.rank:
                self.background.spawn(self.inbox.on_notice(note))
            else:
                self.peers.tell(rank, SidecarVerb.NOTICE, note, f"notice {note.kind}")

    def _reap_streams(self, cutoff: float) -> None:
        for id_, (_, started) in list(self.outbox.streams.items()):
            if started < cutoff:
                logger.warning(
                    "rank %d: stream %r never closed within %.1fs; forgetting it",
                    self.me.rank,
                    id_,
                    self.me.ttl_s,
                )
                del self.outbox.streams[id_]

    def _reap_drops(self, cutoff: float) -> None:
        self.dropped.forget_before(cutoff)

    def _reap_received(self, cutoff: float) -> None:
        mailbox = self.inbox.mailbox
        for id_, box in list(mailbox.boxes.items()):
            for chunk, slot in box.chunks.items():
                if slot.state == "ready" and slot.owned_offset is not None and slot.since < cutoff:
                    self._unclaimed("received", id_, chunk)
                    self.inbox.consume(
                        id_, chunk, slot, state="expired", reason=f"unclaimed for {self.me.ttl_s}s"
                    )
                    self.counters.expired_total += 1
            if box.touched < cutoff and not any(s.state == "ready" for s in box.chunks.values()):
                del mailbox.boxes[id_]
