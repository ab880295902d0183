"""The control plane's contract: subjects, service names, KV buckets and wire schemas.

Every control-plane message between the gateway, the resource manager (RM), the task managers
(TM), the dispatchers and the executors' helpers is defined here, so no service imports another
service's package. Requests are `RequestBase` models (with a request id); callers send them through
the typed clients next to this module (`cornserve.bus.rm_client`, `cornserve.bus.tm_client`), and
handlers reply with a model or a typed error (`ServiceFault`).

Tasks travel as `TaskSpec` = the output of `cornserve.task.serialize_task` (name + config), and
task graphs as lists of `TaskInvocation` JSON (`cornserve.task.TaskInvocation`). Schemas here keep
them as plain JSON dicts so this module does not depend on which task classes are registered.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Protocol

from pydantic import Field

from cornserve.bus.schemas import RequestBase, StoredRecord, WireModel

# ----- service names (nats.micro) ------------------------------------------------------------------

RM_SERVICE_NAME = "cornserve-resource-manager"
TM_SERVICE_NAME = "cornserve-task-manager"
DISPATCHER_SERVICE_NAME = "cornserve-dispatcher"
GATEWAY_SERVICE_NAME = "cornserve-gateway"

# ----- subjects ------------------------------------------------------------------------------------

RM_PREFIX = "cornserve.rm"
RM_DEPLOY = f"{RM_PREFIX}.deploy"
"""DeployRequest -> DeployReply: deploy (or add a user to) unit tasks; replies once all are ready."""
RM_RELEASE = f"{RM_PREFIX}.release"
"""DeploymentReleaseRequest -> DeploymentReleaseReply: drop a user from its tasks; tasks left with no
user are torn down."""
RM_STATE = f"{RM_PREFIX}.state"
"""StateRequest -> ClusterState: every deployment and device (dispatchers catch up with this)."""
RM_SCALE = f"{RM_PREFIX}.scale"
"""ScaleRequest -> DeploymentInfo: set the number of executors of a deployed task."""
RM_EVENTS = f"{RM_PREFIX}.events.deployments"
"""Fan-out DeploymentEvent on every change of a deployment (plain subscription: every replica sees it)."""


def rm_progress_subject(request_id: str) -> str:
    """Where the RM publishes ProgressEvents of one deploy/scale request (for streamed progress)."""
    return f"{RM_PREFIX}.events.progress.{request_id}"


TM_PREFIX = "cornserve.tm"

TaskManagerVerb = Literal["route", "done", "status", "assign", "shutdown", "table", "usage"]
"""The endpoints of a task manager (`done` is a plain subscription, the others nats.micro endpoints)."""


def tm_subject(task_key: str, verb: TaskManagerVerb) -> str:
    """Endpoint `verb` of the task manager of `task_key` (a deployment key: lowercase, digits, '-')."""
    return f"{TM_PREFIX}.{task_key}.{verb}"


DISPATCH_INVOKE = "cornserve.dispatch.invoke"
"""InvokeRequest -> InvokeReply, served by every dispatcher replica in one queue group."""

DISPATCH_QUEUE_GROUP = "cornserve-dispatchers"

DISPATCH_CANCEL = "cornserve.dispatch.cancel"
"""Fan-out InvokeCancel (plain subscription: every replica sees it; the one running the graph aborts it)."""

# ----- KV buckets (JetStream) ----------------------------------------------------------------------

KV_APPS = "cornserve-apps"
"""Gateway: app name -> AppRecord."""
KV_DEPLOYMENTS = "cornserve-deployments"
"""RM: task key -> DeploymentRecord."""
KV_TASKLIBS = "cornserve-tasklibs"
"""Task libraries: library name -> TaskLibraryRecord."""

# ----- shared pieces -------------------------------------------------------------------------------

TaskSpec = dict[str, Any]
"""`{"name": "<library>:<qualname>", "config": {...}}` from cornserve.task.serialize_task."""


class DeviceInfo(WireModel):
    """One device of the inventory and the sidecar that serves it."""

    kind: Literal["cuda", "cpu"]
    index: int = Field(ge=0)
    sidecar_rank: int = Field(ge=0)
    node: str = "local"
    memory_bytes: int | None = Field(default=None, ge=0)
    """The device's memory where the spawner backend knows it (a GPU's; None for CPU slots)."""
    task_key: str | None = None
    """The deployment using the device, if any."""


ExecutorState = Literal["starting", "ready", "unhealthy", "restarting", "draining", "stopped", "failed"]


class ExecutorInfo(WireModel):
    """One executor process of a deployed unit task."""

    executor_id: str
    url: str
    """Base URL of the executor's HTTP server, e.g. http://127.0.0.1:41234."""
    sidecar_ranks: list[int]
    devices: list[DeviceInfo]
    state: ExecutorState
    in_flight: int = 0
    restarts: int = 0
    pid: int | None = None


DeploymentState = Literal["deploying", "ready", "failed", "stopping"]


class DeploymentInfo(WireModel):
    """A deployed unit task: one task manager, its executors and its users."""

    task_key: str
    task: TaskSpec
    state: DeploymentState
    users: list[str]
    executors: list[ExecutorInfo] = Field(default_factory=list)
    devices: list[DeviceInfo] = Field(default_factory=list)
    message: str = ""
    metrics_url: str | None = None
    """The task manager's Prometheus metrics page, as it last reported it (None: none)."""


# ----- resource manager ----------------------------------------------------------------------------


class DeployRequest(RequestBase):
    """Deploy `tasks` for `owner` (an app name or a client session id); idempotent per owner."""

    owner: str = Field(min_length=1, max_length=200)
    tasks: list[TaskSpec] = Field(min_length=1)
    timeout_s: float = Field(default=600.0, gt=0)


class DeployReply(WireModel):
    """The deployments of the requested tasks, in request order, all ready."""

    request_id: str
    deployments: list[DeploymentInfo]


class DeploymentReleaseRequest(RequestBase):
    """Remove `owner` from every task it uses."""

    owner: str = Field(min_length=1, max_length=200)


class DeploymentReleaseReply(WireModel):
    """Which tasks the owner was removed from, and which of them were torn down."""

    request_id: str
    released: list[str]
    torn_down: list[str]


class StateRequest(RequestBase):
    """Ask for the whole cluster state."""


class ClusterState(WireModel):
    """Every deployment and device."""

    request_id: str
    deployments: list[DeploymentInfo]
    devices: list[DeviceInfo]


class ScaleRequest(RequestBase):
    """Run `num_executors` executors of a deployed task (each with the devices its descriptor needs)."""

    task_key: str
    num_executors: int = Field(ge=1)
    timeout_s: float = Field(default=600.0, gt=0)


class DeploymentEvent(WireModel):
    """Published on RM_EVENTS whenever a deployment changes."""

    kind: Literal["ready", "updated", "removed"]
    deployment: DeploymentInfo


class ProgressEvent(WireModel):
    """Progress of a deploy or scale request, published on rm_progress_subject(request_id)."""

    request_id: str
    task_key: str
    stage: Literal[
        "queued", "allocating", "starting_task_manager", "starting_executors", "ready", "shared", "failed"
    ]
    message: str = ""


# ----- task manager --------------------------------------------------------------------------------


class ExecutorAssignment(WireModel):
    """One executor the RM wants running: its id, devices and sidecar ranks."""

    executor_id: str
    devices: list[DeviceInfo] = Field(min_length=1)


class AssignRequest(RequestBase):
    """The desired set of executors; the TM starts missing ones and drains and stops the others."""

    executors: list[ExecutorAssignment] = Field(min_length=1)
    timeout_s: float = Field(default=600.0, gt=0)


class TaskManagerStatusRequest(RequestBase):
    """Ask a task manager for its executors."""


class TaskManagerStatus(WireModel):
    """A task manager's view of its executors."""

    request_id: str
    task_key: str
    ready: bool
    executors: list[ExecutorInfo]
    pid: int | None = None
    """The task manager's process id (lets a restarted RM stop a TM it adopted)."""
    metrics_url: str | None = None
    """The task manager's Prometheus metrics page (None: it runs without a metrics port)."""


class RouteRequest(RequestBase):
    """Pick an executor for one invocation."""


class RouteReply(WireModel):
    """The least-loaded healthy executor; report completion on tm_subject(key, "done")."""

    request_id: str
    executor_id: str
    url: str
    sidecar_ranks: list[int]
    channel: str | None = Field(default=None, max_length=512)
    """``host:port`` of the executor's invocation channel (`cornserve.bus.invoke_channel`); None: HTTP only."""


class RouteDone(WireModel):
    """Published (fire and forget) by a dispatcher when a routed invocation finished."""

    executor_id: str


class TableEntry(WireModel):
    """One routable (ready) executor in a task manager's table."""

    executor_id: str = Field(min_length=1, max_length=128)
    url: str = Field(min_length=1, max_length=2048)
    sidecar_ranks: list[int] = Field(max_length=4096)
    channel: str | None = Field(default=None, max_length=512)
    """``host:port`` of the executor's invocation channel (`cornserve.bus.invoke_channel`); None: HTTP only."""


class ExecutorTable(WireModel):
    """A task manager's routable executors, published (fan-out) on tm_subject(key, "table").

    Published on every change of the set and every `interval_s` otherwise, so a dispatcher routes
    invocations locally (least outstanding) instead of asking `route` for each one. A dispatcher
    takes a table older than `STALE_INTERVALS` times `interval_s` for gone and asks `route` again.
    `instance` names the task-manager process (a re-created one publishes a new instance), and
    `version` grows with every change within an instance; dispatchers acknowledge the version they
    route with in their `ExecutorUsage`, which is how a draining executor knows no one still picks it.
    """

    STALE_INTERVALS: ClassVar[float] = 3.0

    task_key: str = Field(min_length=1, max_length=256)
    instance: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=0)
    executors: list[TableEntry] = Field(max_length=4096)
    interval_s: float = Field(gt=0, le=3600)


class ExecutorUsage(WireModel):
    """A dispatcher replica's use of one task manager's table, on tm_subject(key, "usage").

    Sent when the replica applies a new table version (its acknowledgement), when its outstanding
    invocations change (coalesced) and every `interval_s` while it holds the table. The task manager
    counts `outstanding` in its executors' in-flight numbers and forgets a replica silent for
    `ExecutorTable.STALE_INTERVALS` times `interval_s` (it died: its calls died with it).
    """

    replica_id: str = Field(min_length=1, max_length=128)
    instance: str = Field(max_length=128)
    version: int = Field(ge=0)
    outstanding: dict[str, int] = Field(max_length=4096)
    routed: dict[str, int] = Field(default_factory=dict, max_length=4096)
    """Invocations this replica has routed to each executor from this key's tables since it started
    (cumulative, so a lost report loses nothing): the task manager's routed counters. The
    acknowledgement and the periodic report name every executor; a change report only those whose
    count changed since the replica's last report (an executor not named: no news)."""
    interval_s: float = Field(gt=0, le=3600)


class ShutdownRequest(RequestBase):
    """Stop every executor and exit; answered with AckReply."""


class AckReply(WireModel):
    """A plain acknowledgement (of a task manager's shutdown or of a requested RouteDone)."""

    request_id: str


# ----- dispatcher ----------------------------------------------------------------------------------


class InvokeRequest(RequestBase):
    """Execute one recorded graph.

    If an invocation streams (at most one: the graph's result, at any position), the dispatcher
    publishes StreamMessages on `stream_subject` (the caller subscribes before sending) and its
    output in the reply is None.
    """

    invocations: list[dict[str, Any]] = Field(min_length=1)
    timeout_s: float = Field(default=300.0, gt=0)
    stream_subject: str | None = None
    keepalive_subject: str | None = None
    """If set, the replica that takes the graph publishes InvokeKeepalive here at once (the
    acknowledgement) and every `keepalive_interval_s` until the reply and any relayed stream are
    done, so the caller learns within seconds that the replica died (see docs/architecture.md)."""
    keepalive_interval_s: float = Field(default=1.0, gt=0, le=60)
    cancel_id: str | None = Field(default=None, min_length=8, max_length=128)
    """If set, an InvokeCancel on DISPATCH_CANCEL naming it aborts the graph (and its relayed
    stream): the caller gave up. Unique per attempt and unguessable (the caller's random token)."""
    reply_parts_subject: str | None = None
    """If set (with `max_reply_bytes`), a reply larger than one bus message is published here as
    ordered parts instead of being refused (`cornserve.bus.reply_parts`); nothing then comes on the
    reply subject. Older dispatchers ignore it and answer `output_too_large` as before."""
    max_reply_bytes: int | None = Field(default=None, gt=0)
    """The largest reply the caller accepts in parts; a larger one is `output_too_large` (nothing sent)."""


class InvokeCancel(WireModel):
    """Published on DISPATCH_CANCEL when a caller gives up on a graph (client gone, deadline passed).

    The replica running the graph with this `cancel_id` cancels it: executor requests are dropped
    (their connections closed), the relayed stream stops, routed invocations are reported done.
    Nothing is replied; a cancel for a graph no replica runs (already finished) is ignored.
    """

    cancel_id: str = Field(min_length=8, max_length=128)
    request_id: str = ""
    reason: str = Field(default="", max_length=500)


class InvokeReply(WireModel):
    """One output (TaskOutput JSON) per invocation; None for a streamed output."""

    request_id: str
    outputs: list[dict[str, Any] | None]


class InvokeKeepalive(WireModel):
    """Published on InvokeRequest.keepalive_subject: `seq` 0 acknowledges the graph, then one per interval."""

    request_id: str
    replica_id: str
    seq: int = Field(ge=0)


class StreamMessage(WireModel):
    """One message of a relayed stream: an item, several items, the end, or an error (which also ends it).

    `seq` numbers the messages (0, 1, ...; the caller restores their order). A relay that fell
    behind its producer sends the items that piled up as one message (`items`, in order) instead
    of one message each; a relay that keeps up sends one `item` per message. The last items may
    carry `end` themselves (the producer's response ended in the read that brought them).
    """

    seq: int = Field(ge=0)
    item: dict[str, Any] | None = None
    items: list[dict[str, Any]] | None = None
    end: bool = False
    error: str | None = None
    abort: bool = False
    """The stream failed where its messages' count is unknown (`end` and `error` come with it).

    Sent by a dispatcher whose executor published the stream itself (see `STREAM_SUBJECT_HEADER`)
    and then failed without saying how far it got: the caller ends the stream with `error` when
    it next waits for a message, whatever `seq` the others reached.
    """


def stream_items_message(seq: int, items: Sequence[bytes], end: bool = False) -> bytes:
    """The wire form of a `StreamMessage` carrying `items`, each already one JSON object's text.

    Relays build it by joining bytes instead of building the model and dumping it again: each item
    is framed, not re-validated (the caller validates it once, against the stream's item type). An
    item must be exactly one JSON object (its sender checked it), so it cannot break the framing.
    `end`: the stream's last message (its last items and its end together, one message less).
    """
    if not items:
        raise ValueError("a stream message carries at least one item")
    tail = b',"end":true}' if end else b"}"
    if len(items) == 1:
        return b'{"seq":%d,"item":%s%s' % (seq, items[0], tail)
    return b'{"seq":%d,"items":[%s]%s' % (seq, b",".join(items), tail)


STREAM_MESSAGE_ROOM = 4096
"""Bytes of the NATS payload limit a stream message keeps for its framing and headers."""


def stream_item_limit(max_payload: int) -> int:
    """The most bytes of items one stream message may carry on a connection whose limit is `max_payload`."""
    return max(max_payload - STREAM_MESSAGE_ROOM, STREAM_MESSAGE_ROOM)


def stream_batches(items: Sequence[bytes], max_payload: int) -> list[list[bytes]]:
    """`items` in order, in as few messages' worth as the payload limit allows.

    What a relay and an executor publishing its own stream both send: one message per batch. An
    item too big for a message is a batch alone (its publish then fails with the limit's error).
    """
    limit = stream_item_limit(max_payload)
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    size = 0
    for item in items:
        if batch and size + len(item) + 1 > limit:
            batches.append(batch)
            batch, size = [], 0
        batch.append(item)
        size += len(item) + 1
    if batch:
        batches.append(batch)
    return batches


def stream_abort_message(error: str) -> bytes:
    """The wire form of a `StreamMessage` that ends a published stream whose count was lost."""
    return StreamMessage(seq=0, end=True, error=error, abort=True).model_dump_json().encode()


STREAM_SUBJECT_HEADER = "Cornserve-Stream-Subject"
"""Request header: the executor may publish the stream's items itself, as StreamMessages on this subject.

A dispatcher sets it on the HTTP request of a graph's streaming invocation when nothing else can
still fail the stream (no tail). An executor that honors it answers with `STREAM_PUBLISHED_HEADER`
and publishes every message of the stream from seq 0, the last one with `end` (one hop less per item
than the dispatcher reading the response and publishing it); its HTTP body then carries only
newlines while it runs (at most one a second: the dispatcher's idle deadline) and one
`PublishedStreamEnd` line at the end. An executor that does not answer with the header streams its
response as usual and the dispatcher relays it.
"""
STREAM_PUBLISHED_HEADER = "Cornserve-Stream-Published"
"""Response header (value "1"): the executor publishes the stream itself (`STREAM_SUBJECT_HEADER`)."""


class PublishedStreamEnd(WireModel):
    """The last line of a published stream's HTTP body: how it ended, for the dispatcher.

    `end`: the executor published the stream's end (with its last items) and there is nothing to do.
    Otherwise the stream failed after `messages` messages: `line` is the failure as the executor's
    streamed response would have carried it (one stream line, read by the task's descriptor), and
    the dispatcher publishes the end with that error as message number `messages`.
    """

    messages: int = Field(ge=0)
    items: int = Field(default=0, ge=0)
    """Items the messages carried (the dispatcher's stream counters)."""
    end: bool
    line: str | None = Field(default=None, max_length=65536)


# ----- durable records -----------------------------------------------------------------------------
# Kept in the KV buckets above; `StoredRecord` says how they are versioned and read tolerantly.


class AppRecord(StoredRecord):
    """A registered app as the gateway stores it (in KV_APPS under its name)."""

    name: str
    source: str
    state: Literal["deploying", "ready", "failed", "removing"]
    task_keys: list[str] = Field(default_factory=list)
    message: str = ""
    created_at: float

    def stored_under(self) -> str:
        """Its name."""
        return self.name


class TaskLibraryRecord(StoredRecord):
    """An uploaded task library (Python source defining unit task and descriptor classes).

    Stored in KV_TASKLIBS under its name.
    """

    name: str
    source: str
    sha256: str
    unit_tasks: list[str]
    descriptors: list[str]
    created_at: float

    def stored_under(self) -> str:
        """Its name."""
        return self.name

    @classmethod
    def from_loaded(cls, source: str, library: LoadedLibraryFacts) -> TaskLibraryRecord:
        """The record to store for a library just loaded from `source` (so its classes are known)."""
        return cls(
            name=library.name,
            source=source,
            sha256=library.sha256,
            unit_tasks=list(library.unit_tasks),
            descriptors=list(library.descriptors),
            created_at=time.time(),
        )


class LoadedLibraryFacts(Protocol):
    """What a loaded task library tells about itself (`cornserve.task.library.LoadedLibrary` fits).

    Structural, so that the bus needs no dependency on the task package.
    """

    @property
    def name(self) -> str:
        """The library name."""
        ...

    @property
    def sha256(self) -> str:
        """Content hash of its source."""
        ...

    @property
    def unit_tasks(self) -> Sequence[str]:
        """Unit task classes it registered."""
        ...

    @property
    def descriptors(self) -> Sequence[str]:
        """Descriptor classes it registered."""
        ...


class DeploymentRecord(StoredRecord):
    """The RM's durable record of one deployment (in KV_DEPLOYMENTS under its task key)."""

    task_key: str
    task: TaskSpec
    users: list[str]
    devices: list[DeviceInfo]
    num_executors: int = 1
    tm_pid: int | None = None
    """Process id of the task manager (local spawner), so a restarted RM can stop one it adopted."""

    def stored_under(self) -> str:
        """Its task key."""
        return self.task_key
