"""Wire schemas of the sidecar's control plane.

Only control messages travel over NATS: where bytes live (arena name, offset, size), tensor
metadata and bookkeeping. Payload bytes never do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from cornserve.bus.schemas import RequestBase, WireModel

DataKind = Literal["torch", "numpy", "object", "cuda"]
NoticeKind = Literal["lost", "expired"]

MAX_ID_LEN = 256

DataId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]
"""The sender-chosen id of one piece of data (all its chunks share it)."""
ChunkIndex = Annotated[int, Field(ge=0)]
"""Position of a chunk within its data (0 for single-chunk data)."""
Rank = Annotated[int, Field(ge=0)]
"""A global sidecar rank (one per device)."""


class DataMeta(WireModel):
    """How to rebuild the sender's value from raw bytes."""

    kind: DataKind
    dtype: str = "uint8"
    shape: list[int] = Field(default_factory=list)
    nbytes: int = Field(ge=0)


class Location(WireModel):
    """Where the bytes of one chunk live.

    ``shm``: ``arena`` names a file under /dev/shm owned by a sidecar server on this node.
    ``cuda_ipc``: ``cuda_handle`` is a hex CUDA IPC memory handle of a buffer on ``device``.
    ``nccl``: the GPU bytes stay with the producer client of ``rank`` on another node; the consumer
    pulls them over a pairwise NCCL communicator.
    """

    transport: Literal["shm", "cuda_ipc", "nccl"] = "shm"
    rank: int = -1
    """Rank of the producer (source) sidecar."""
    arena: str = ""
    offset: int = Field(default=0, ge=0)
    size: int = Field(default=0, ge=0)
    meta: DataMeta
    cuda_handle: str = Field(default="", pattern=r"^([0-9a-f]{128})?$")
    """Hex of a 64-byte ``cudaIpcMemHandle_t`` (of the allocation; ``offset`` is inside it)."""
    device: int = 0
    node: str = ""


def _check_groups(groups: list[list[int]]) -> list[list[int]]:
    if not groups or any(not g for g in groups):
        raise ValueError("dst_ranks must be a non-empty list of non-empty rank groups")
    if any(r < 0 for g in groups for r in g):
        raise ValueError("ranks must be >= 0")
    return groups


class Key(WireModel):
    """Identity of one chunk of one piece of data."""

    id: DataId
    chunk_id: ChunkIndex


class ChunkRequest(RequestBase):
    """A request about one chunk of one piece of data (the fields every chunk request shares)."""

    id: DataId
    chunk_id: ChunkIndex


class InfoRequest(RequestBase):
    """Ask a sidecar server who it is (rank, node, instance, arena, TCP address)."""


class InfoReply(WireModel):
    """Identity of a sidecar server instance."""

    request_id: str
    rank: int
    node: str
    instance: str
    version: str
    arena: str
    arena_bytes: int
    tcp_host: str
    tcp_port: int
    ttl_s: float
    prefaulted: bool = False
    local_socket: str = ""
    """Path of the server's same-node control socket (`cornserve.bus.sidecar_local`); empty: NATS only."""


class StatsRequest(RequestBase):
    """Ask for arena usage and bookkeeping counters."""


class ArenaUsage(WireModel):
    """How full a server's arena is; ``used_bytes == 0`` means nothing is leaked.

    ``used_bytes + spare_bytes + free_bytes == arena_bytes``: clients' spare reservations (see
    `AllocRequest.spare`) are counted apart, since a live client keeps them on purpose.
    """

    arena_bytes: int
    used_bytes: int
    free_bytes: int
    largest_free_block: int
    free_blocks: int
    allocations: int
    """Blocks allocated now, spare reservations not included."""
    spare_bytes: int = 0
    """Bytes clients reserved ahead for their next send (`AllocRequest.spare`), not yet used."""


class StatsReply(ArenaUsage):
    """Arena usage plus the server's bookkeeping counters (the leak tests' ground truth)."""

    request_id: str
    rank: int
    instance: str
    held_entries: int
    mailbox_entries: int
    pending_allocs: int
    """Allocations handed to clients and not yet sent or freed, spare reservations not included."""
    spare_allocs: int = 0
    """Spare reservations clients hold now (`AllocRequest.spare`); freed when their client closes."""
    expired_total: int
    lost_total: int
    dropped_total: int = 0
    """Chunks freed because their graph was given up (`DropRequest`), before their TTL."""
    known_peers: dict[str, str]
    sent_by_path: dict[str, int] = Field(default_factory=dict)
    """Chunks delivered to destinations since start, by path: `shm` / `cuda_ipc` (same node), `tcp` /
    `nccl` (another node)."""
    socket_requests: int = 0
    """Requests answered on the same-node control socket (`cornserve.bus.sidecar_local`) since start."""


class AllocRequest(RequestBase):
    """Reserve ``size`` bytes in the server's arena, waiting up to ``timeout`` under memory pressure."""

    size: int = Field(ge=0)
    timeout: float = Field(gt=0)
    spare: bool = False
    """Reserved ahead, for the client's next copy send of this size (so that send needs no ``alloc``
    round trip); the server reports it apart (``spare_bytes``) and reclaims it after the TTL like any
    unsent allocation."""


class AllocReply(WireModel):
    """A reservation in the arena; it is reclaimed after the TTL unless sent or freed."""

    request_id: str
    instance: str
    arena: str
    offset: int
    size: int


class FreeRequest(RequestBase):
    """Give back an allocation that will not be sent."""

    instance: str
    offset: int = Field(ge=0)


class SendRequest(ChunkRequest):
    """Publish one chunk whose bytes are already at ``location`` to every rank in ``dst_ranks``."""

    num_chunks: int | None = Field(default=1, ge=1)
    dst_ranks: list[list[int]]
    instance: str
    location: Location
    timeout: float = Field(gt=0)
    notify_released: bool = False
    """Publish a `ReleasedEvent` for this chunk once every destination is done with it (or it was
    freed anyway: TTL, drop), as for GPU chunks: how a stream's producer keeps a window of
    outstanding chunks (`cornserve.sidecar.streaming`)."""

    @field_validator("dst_ranks")
    @classmethod
    def check_dst_ranks(cls, value: list[list[int]]) -> list[list[int]]:
        """Reject empty groups and negative ranks at the boundary."""
        return _check_groups(value)


class CloseStreamRequest(RequestBase):
    """Declare the length of a stream whose chunks were sent with ``num_chunks=None``."""

    id: DataId
    num_chunks: int = Field(ge=0)
    dst_ranks: list[list[int]] | None = None
    timeout: float = Field(gt=0)


class RecvRequest(ChunkRequest):
    """Wait up to ``timeout`` for chunk ``chunk_id`` of ``id`` to arrive at this server."""

    timeout: float = Field(gt=0)


class RecvReply(WireModel):
    """Where the chunk is, or ``end_of_stream`` when ``chunk_id`` is past the stream's end."""

    request_id: str
    instance: str
    location: Location | None = None
    end_of_stream: bool = False


class DropRequest(RequestBase):
    """Dispatcher -> sidecar: the graph these data ids belong to was given up (cancelled or failed).

    The server frees every chunk of them it holds (as source or destination) now rather than at its
    TTL, and for a while refuses their late sends and deliveries (`data_dropped`).
    """

    ids: list[DataId] = Field(min_length=1, max_length=4096)
    reason: str = Field(default="", max_length=500)


class DoneRequest(ChunkRequest):
    """The consumer is finished with a chunk: its memory may be released."""


class SidecarAck(WireModel):
    """A sidecar server (or producer client) did what was asked; ``instance`` names who answered.

    Carrying the instance lets a client notice that its server restarted between two calls.
    """

    request_id: str
    instance: str


# --- peer to peer -------------------------------------------------------------------------------


class ChunkAnnouncement(ChunkRequest):
    """Source server -> destination server about one chunk: who sends it to whom.

    ``num_chunks`` is the data's length, or None while a stream's length is still unknown.
    """

    num_chunks: int | None = Field(default=1, ge=0)
    source_rank: Rank
    source_instance: str
    dst_rank: Rank


class DeliverRequest(ChunkAnnouncement):
    """Source server -> destination server: a chunk is available at ``location`` (or a stream ended)."""

    location: Location | None = None
    """None for a pure end-of-stream announcement."""


class ReleaseChunkRequest(RequestBase):
    """Destination server -> source server: ``dst_rank`` is done with the chunk the source holds."""

    key: Key
    dst_rank: Rank
    source_instance: str


class NoticeRequest(RequestBase):
    """Source server -> destination server: these chunks will never be readable (lost or expired)."""

    kind: NoticeKind
    keys: list[Key]
    source_rank: int
    reason: str


class NcclPullRequest(ChunkRequest):
    """Consumer client -> producer client (other node): NCCL-send me this GPU chunk now."""

    dst_rank: Rank
    nccl_uid: str = Field(default="", pattern=r"^([0-9a-f]{256})?$")
    """Hex of a fresh 128-byte NCCL unique id when the consumer starts a new communicator for this
    direction (the producer then aborts its old one and joins); empty to reuse the current one."""


class UpEvent(WireModel):
    """Published on :data:`~cornserve.bus.subjects.SIDECAR_UP_EVENT` when a server (re)starts."""

    rank: int
    node: str
    instance: str


class ReleasedEvent(WireModel):
    """Tells a producer's clients that chunks are released.

    GPU tensors they keep alive may be dropped, and chunks sent with `notify_released` no longer
    count against a stream's window.
    """

    instance: str
    keys: list[Key]


# --- TCP data path between servers on different nodes -----------------------------------------


class TcpHeader(ChunkAnnouncement):
    """First frame of a cross-node transfer; the payload bytes follow once the receiver said ready."""

    meta: DataMeta
    size: int = Field(ge=0)
    timeout: float = Field(gt=0, allow_inf_nan=False)
    """The sender's deadline; the receiver caps it at its own ``--tcp-max-timeout``."""


class TcpAck(WireModel):
    """Receiver's answer: first after allocating (ready), then after the bytes landed (done)."""

    ok: bool
    error: str = ""
    message: str = ""


# --- TCP peer authentication (before any header is read) ----------------------------------------


class TcpChallenge(WireModel):
    """Receiver -> sender, first frame of every connection: prove you hold the cluster's peer secret.

    ``nonce`` is fresh random hex per connection, so a recorded answer is worth nothing later.
    """

    nonce: str = Field(min_length=32, max_length=128)
    rank: Rank
    """The receiving server's rank (the sender checks it is the rank it meant to reach)."""


class TcpHello(WireModel):
    """Sender -> receiver: who is sending to whom, and the HMAC of the challenge under the secret.

    ``nonce`` is the sender's own challenge: the receiver's :class:`TcpProof` answers it (mutual auth).
    """

    source_rank: Rank
    dst_rank: Rank
    nonce: str = Field(min_length=32, max_length=128)
    mac: str = Field(min_length=64, max_length=64)


class TcpProof(WireModel):
    """Receiver -> sender: ``mac`` answers the sender's nonce (the receiver holds the secret too).

    ``ok`` False (with ``message``) says the sender's answer was wrong; the connection then closes.
    """

    ok: bool
    mac: str = Field(default="", max_length=64)
    message: str = Field(default="", max_length=1024)


class TcpSent(WireModel):
    """Sender -> receiver, right after the payload: how many bytes it sent.

    A payload longer than the header announced turns this frame into garbage, so the receiver sees
    it instead of silently dropping the excess.
    """

    nbytes: int = Field(ge=0)
