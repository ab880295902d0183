"""Freeing the forwards of a graph that was given up, in the sidecars that hold them.

A graph cancelled by its caller, failed or timed out may have sent forwards already (an encoder's
embeddings landed in its consumers' sidecars) that no consumer will read now. The sidecars would
keep them until their TTL (300 s by default); the dispatcher knows every forward's id and its
source and destination ranks (it wired them), so it tells each of those sidecars to drop them
(`DropRequest` on `cornserve.sidecar.<rank>.drop`). Fire and forget, each request with a short
deadline: a sidecar that does not answer still frees them at its TTL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from nats.aio.client import Client

from cornserve.bus.micro import BusError, request
from cornserve.bus.sidecar import DropRequest, SidecarAck
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.task import TaskInvocation
from cornserve.task.forward import iter_forwards

logger = logging.getLogger(__name__)

DROP_TIMEOUT_S = 2.0
"""How long one sidecar gets to acknowledge a drop."""
MAX_IDS_PER_REQUEST = 4096
"""`DropRequest.ids`' bound; a graph with more forwards on one rank sends several requests."""


def forwards_by_rank(invocations: Sequence[TaskInvocation]) -> dict[int, list[str]]:
    """The ids of the graph's wired forwards, by every sidecar rank that may hold them (source or destination)."""
    found: dict[int, dict[str, None]] = {}
    for inv in invocations:
        for fwd in [*iter_forwards(inv.task_output), *iter_forwards(inv.task_input)]:
            ranks = [*(fwd.src_sidecar_ranks or []), *(r for g in fwd.dst_sidecar_ranks or [] for r in g)]
            for rank in ranks:
                found.setdefault(rank, {})[fwd.id] = None
    return {rank: list(ids) for rank, ids in found.items()}


async def drop_forwards(nc: Client, by_rank: dict[int, list[str]], reason: str) -> None:
    """Ask each sidecar to drop the graph's forwards it holds; failures are logged, never raised."""

    async def one(rank: int, ids: list[str]) -> None:
        try:
            await request(
                nc,
                sidecar_subject(rank, SidecarVerb.DROP),
                DropRequest(ids=ids, reason=reason[:500]),
                SidecarAck,
                DROP_TIMEOUT_S,
            )
        except (BusError, ValueError) as exc:  # ValueError: an id the wire refuses
            logger.warning(
                "sidecar rank %d did not drop %d forward(s) (%s); its TTL frees them", rank, len(ids), exc
            )

    await asyncio.gather(
        *(
            one(rank, ids[i : i + MAX_IDS_PER_REQUEST])
            for rank, ids in by_rank.items()
            for i in range(0, len(ids), MAX_IDS_PER_REQUEST)
        )
    )
