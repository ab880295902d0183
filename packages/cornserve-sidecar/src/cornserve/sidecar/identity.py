"""Who one sidecar server instance is: the facts every part of the server refers to.

``instance`` is new at every start, so peers and clients can tell a restarted server (whose arena,
and everything in it, is gone) from the one they talked to before.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from cornserve.bus.micro import ServiceFault
from cornserve.bus.sidecar import SidecarAck


def new_instance_id() -> str:
    """A fresh id for one server process's lifetime."""
    return uuid.uuid4().hex[:16]


@dataclass
class ServerIdentity:
    """Rank, node and instance of this server plus the settings peers see in its info."""

    rank: int
    node: str
    ttl_s: float
    tcp_host: str
    """The address the TCP listener binds."""
    tcp_port: int = 0
    """0 until the TCP listener is bound; then the bound port."""
    advertise_host: str | None = None
    """The address peers on other nodes connect to (default: `tcp_host`)."""
    prefault: bool = False
    instance: str = field(default_factory=new_instance_id)

    @property
    def reachable_host(self) -> str:
        """What this server tells its peers to connect to."""
        return self.advertise_host or self.tcp_host

    def ack(self, request_id: str) -> SidecarAck:
        """The success reply of this instance."""
        return SidecarAck(request_id=request_id, instance=self.instance)

    def check_instance(self, instance: str, what: str) -> None:
        """Refuse a reference (``what``) minted by a previous instance of this rank: its data is gone."""
        if instance != self.instance:
            raise ServiceFault(
                410,
                "data_lost",
                f"rank {self.rank} restarted: the {what} belonged to instance {instance}, "
                f"now {self.instance}",
                rank=self.rank,
            )


@dataclass
class LossCounters:
    """How many chunks this server gave up on, by reason (reported in stats)."""

    expired_total: int = 0
    lost_total: int = 0
    dropped_total: int = 0
