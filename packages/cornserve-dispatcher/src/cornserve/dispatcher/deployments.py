"""The dispatcher's view of which unit tasks are deployed, kept in step with the resource manager.

Every replica follows the RM's fan-out DeploymentEvents (a plain subscription, so every replica
sees every event) and catches up with one RM_STATE request at start. The RM may not be running
when a replica starts: the catch-up retries in the background with backoff while the replica
already serves. Events are fire-and-forget (one lost while NATS reconnects is gone for good), so
the replica also re-syncs with a full RM_STATE snapshot every `resync_interval_s`. Events can lag a
deploy reply, so a lookup that misses, or finds a deployment that is not ready (a "failed" entry
may have been re-deployed since), re-queries the RM once before the caller reports the task as
not deployed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cornserve.bus.control import RM_EVENTS, DeploymentEvent, DeploymentInfo
from cornserve.bus.events import parse_event
from cornserve.bus.micro import BusError
from cornserve.bus.rm_client import ResourceManagerClient
from cornserve.runtime.natsstop import nats_step

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DeploymentCache:
    """Deployments by task key, from RM_STATE snapshots and RM_EVENTS updates."""

    nc: Client
    _: KW_ONLY
    state_timeout_s: float = 3.0
    """Deadline of one RM_STATE query."""
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    """Bounds of the pause between catch-up attempts while the resource manager does not answer."""
    resync_interval_s: float = 30.0
    """Pause between full re-syncs once caught up (events keep the view current in between)."""
    _deployments: dict[str, DeploymentInfo] = field(default_factory=dict, init=False)
    _touched: set[str] | None = field(default=None, init=False)
    """Keys changed by events while a snapshot is in flight (the events are newer than it)."""
    _refreshing: asyncio.Future[bool] | None = field(default=None, init=False)
    _sub: Subscription | None = field(default=None, init=False)
    _catch_up: asyncio.Task[None] | None = field(default=None, init=False)
    synced: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    """Set once one RM_STATE snapshot has been applied."""
    _rm: ResourceManagerClient = field(init=False)

    def __post_init__(self) -> None:
        self._rm = ResourceManagerClient(self.nc, state_timeout_s=self.state_timeout_s)

    async def start(self) -> None:
        """Follow events first (so none is missed), then catch up with the RM in the background."""
        self._sub = await self.nc.subscribe(RM_EVENTS, cb=self._on_event)
        self._catch_up = asyncio.create_task(self._follow_forever(), name="rm-resync")

    async def stop(self) -> None:
        """Stop following the RM."""
        if self._catch_up is not None:
            self._catch_up.cancel()
            await asyncio.gather(self._catch_up, return_exceptions=True)
        if self._sub is not None:
            await nats_step("unsubscribing from RM events", self._sub.unsubscribe)

    def get(self, task_key: str) -> DeploymentInfo | None:
        """The cached deployment of `task_key`, if any."""
        return self._deployments.get(task_key)

    def keys(self) -> list[str]:
        """Every cached task key."""
        return sorted(self._deployments)

    async def lookup(self, task_keys: Iterable[str]) -> dict[str, DeploymentInfo | None]:
        """Deployments of `task_keys`; a miss or a deployment not ready triggers one fresh RM_STATE query."""
        keys = list(dict.fromkeys(task_keys))
        if any(self._stale(key) for key in keys):
            await self.refresh()
        return {key: self._deployments.get(key) for key in keys}

    async def refresh(self) -> bool:
        """Query RM_STATE now (concurrent callers share one query); False if the RM did not answer."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._query_state())
        return await asyncio.shield(self._refreshing)

    # ----- internals -------------------------------------------------------------------------------

    def _stale(self, key: str) -> bool:
        info = self._deployments.get(key)
        return info is None or info.state != "ready"

    async def _query_state(self) -> bool:
        self._touched = set()
        try:
            state = await self._rm.state()
        except BusError as exc:
            logger.info("resource manager state unavailable: %s", exc)
            return False
        finally:
            touched, self._touched = self._touched or set(), None
        fresh = {d.task_key: d for d in state.deployments}
        for key in list(self._deployments):
            if key not in fresh and key not in touched:
                del self._deployments[key]
        for key, info in fresh.items():
            if key not in touched:
                self._deployments[key] = info
        if not self.synced.is_set():
            logger.info("caught up with the resource manager: %d deployment(s)", len(fresh))
        self.synced.set()
        return True

    async def _follow_forever(self) -> None:
        """Catch up (with backoff while the RM does not answer), then re-sync every `resync_interval_s`."""
        backoff = self.initial_backoff_s
        while True:
            if await self.refresh():
                backoff = self.initial_backoff_s
                await asyncio.sleep(self.resync_interval_s)
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _on_event(self, msg: Msg) -> None:
        event = parse_event(DeploymentEvent, msg, logger)
        if event is None:
            return
        key = event.deployment.task_key
        if self._touched is not None:
            self._touched.add(key)
        if event.kind == "removed":
            self._deployments.pop(key, None)
        else:
            self._deployments[key] = event.deployment
        logger.debug("deployment %s: %s (%s)", key, event.kind, event.deployment.state)
