"""Spare arena reservations a client keeps for its next copy send of a size it sent before.

Why: a copy send too big to ride a ``put`` first asks its server for arena space (an ``alloc``
round trip) and only then writes its bytes and sends. Producers send the same sizes again and again
(one embedding per request, one hidden-state chunk per step), so right after such a send the client
reserves the next block of that size in the background (``AllocRequest.spare``); the next send of
that size writes straight into it. The reservation is an ordinary unsent allocation on the server:
reported apart (``spare_bytes``), reclaimed by the server's TTL if the client dies, freed by the
client at close.

A spare is only used while it is younger than half the server's TTL, so the server can never have
reclaimed it (and handed its bytes to someone else) when the client writes into it. Spares are
bounded: at most :data:`MAX_SIZES` sizes, one block each, together at most 1/:data:`ARENA_SHARE` of
the arena and :data:`MAX_BYTES`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MAX_SIZES = 2
"""Distinct sizes a client keeps a spare for."""
MAX_BYTES = 64 << 20
"""Most bytes of spares a client holds together."""
ARENA_SHARE = 16
"""Spares of one client take at most this fraction (1/n) of its server's arena."""
RESERVE_TIMEOUT_S = 1.0
"""A spare is reserved only if room is there now (or within this); it never waits out memory pressure."""


@dataclass(frozen=True)
class Spare:
    """One reserved block: where, in which server instance, since when."""

    instance: str
    offset: int
    size: int
    reserved_at: float = field(default_factory=time.monotonic)


class Spares:
    """The spares one client holds, by size, and the sizes being reserved now."""

    def __init__(self) -> None:
        self._held: dict[int, Spare] = {}
        self._reserving: set[int] = set()

    def take(self, size: int, instance: str, ttl_s: float) -> tuple[Spare | None, list[Spare]]:
        """The spare for ``size`` if it is usable now, and the held spares that no longer are.

        Unusable: reserved in another server instance (gone with it), or older than half the TTL
        (the server may reclaim it soon). The caller frees the stale ones (of the current instance).
        """
        now = time.monotonic()
        stale = [s for s in self._held.values() if s.instance != instance or now - s.reserved_at > ttl_s / 2]
        for s in stale:
            del self._held[s.size]
        return self._held.pop(size, None), stale

    def wants(self, size: int, arena_bytes: int) -> bool:
        """Whether to reserve a spare of ``size`` now (none held or coming, and within the bounds)."""
        if size in self._held or size in self._reserving:
            return False
        if len(self._held) + len(self._reserving) >= MAX_SIZES:
            return False
        committed = sum(self._held) + sum(self._reserving) + size
        return committed <= min(MAX_BYTES, arena_bytes // ARENA_SHARE)

    def reserving(self, size: int) -> None:
        """A reservation of ``size`` is under way."""
        self._reserving.add(size)

    def reserved(self, spare: Spare | None, size: int) -> bool:
        """The reservation of ``size`` ended (``spare`` None: it failed); whether the spare was kept.

        A spare not kept (one of that size arrived meanwhile) must be freed by the caller.
        """
        self._reserving.discard(size)
        if spare is None or size in self._held:
            return False
        self._held[size] = spare
        return True

    def drain(self) -> list[Spare]:
        """Every held spare, forgotten here (at close: the caller frees them)."""
        held = list(self._held.values())
        self._held.clear()
        return held
