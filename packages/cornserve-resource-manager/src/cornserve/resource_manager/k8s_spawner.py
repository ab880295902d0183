"""The `kubernetes` spawner: task managers as pods, through the Kubernetes API (lightkube).

Why lightkube: it is maintained, asyncio-native, fully typed (mypy strict needs no stubs), and
small: models generated from the API's OpenAPI document, with no code generator at install time.
kubernetes-asyncio is a larger generated client without type hints; kr8s is friendlier for
scripts but looser in types. The pod itself is a plain manifest from `k8s_pods.task_manager_pod`
(a pure function the tests validate against the API schemas), created as it is.

The `Spawner` interface asks synchronous questions (is it alive, which ones run), while the API is
remote: the spawner keeps a snapshot of its pods, refreshed by listing them (by their labels) every
`poll_s` seconds and after every create or delete. A handle answers from the snapshot: "running"
until a list shows its pod ended or gone. Every API call has a deadline (the client's timeout), and
a failed call is a `KubernetesApiError`: a 502 fault that says what was asked and what the API said.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.core.exceptions import ConfigError
from lightkube.resources.core_v1 import ConfigMap, Node, Pod

from cornserve.bus.control import DeviceInfo, TaskSpec
from cornserve.bus.micro import ServiceFault
from cornserve.resource_manager.k8s_nodes import (
    DeviceKind,
    NodeError,
    NodeView,
    first_ranks,
    inventory,
    node_view,
)
from cornserve.resource_manager.k8s_pods import (
    LABEL_TASK_KEY_HASH,
    KubernetesSettings,
    PlacementError,
    PodPlacement,
    placement_of,
    selector_labels,
    task_key_hash,
    task_manager_pod,
)
from cornserve.resource_manager.k8s_state import PodState, pod_state
from cornserve.resource_manager.spawner import TaskManagerHandle

logger = logging.getLogger(__name__)

API_TIMEOUT_S = 15.0
"""One API call (connect, read); a slower API server is an error, not a hang."""
KILL_SLACK_S = 30.0
"""How long past its grace period a deleted pod may take to disappear before it is force-deleted."""
FORCE_DELETE_WAIT_S = 10.0
"""How long a force-deleted pod may take to disappear before `kill` gives up with an error."""
LOG_TAIL_LINES = 40
API_ERRORS = (httpx2.HTTPError, ValueError)
"""What a failed API call raises: transport and HTTP errors (lightkube's ApiError is one), and
answers that do not decode as the API's objects (lightkube's decoder raises ValueError subclasses)."""


class KubernetesApiError(ServiceFault):
    """A call to the Kubernetes API failed (or timed out): a 502 naming the call and the API's answer."""

    def __init__(self, action: str, detail: str, status: int | None = None) -> None:
        hint = ""
        if status == 403:
            hint = (
                " (the resource manager's ServiceAccount needs the Role in deploy/k8s/resource-manager.yaml)"
            )
        super().__init__(502, "kubernetes_api_error", f"Kubernetes API: {action} failed: {detail}{hint}")
        self.status = status


class KubernetesConfigError(RuntimeError):
    """Neither an in-cluster service account nor a kubeconfig is available."""


def _api_error(action: str, exc: Exception) -> KubernetesApiError:
    if isinstance(exc, ApiError):
        st = exc.status
        return KubernetesApiError(
            action, f"HTTP {st.code} {st.reason or ''}: {st.message or ''}".strip(), st.code
        )
    if isinstance(exc, httpx2.HTTPStatusError):  # an answer that is not the API's JSON Status
        code = exc.response.status_code
        return KubernetesApiError(action, f"HTTP {code}: {exc.response.text[:500]}", code)
    return KubernetesApiError(action, f"{type(exc).__name__}: {exc}")


def _is_not_found(exc: Exception) -> bool:
    return isinstance(exc, httpx2.HTTPStatusError) and exc.response.status_code == 404


def load_config(kubeconfig: str | None = None) -> KubeConfig:
    """The API's address and credentials: `kubeconfig` if given, else in-cluster, KUBECONFIG, ~/.kube/config."""
    try:
        return KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
    except (ConfigError, OSError, KeyError) as exc:
        raise KubernetesConfigError(
            "--spawner kubernetes needs the Kubernetes API: run in a pod with a ServiceAccount, or set "
            f"KUBECONFIG / --k8s-kubeconfig ({type(exc).__name__}: {exc})"
        ) from exc


class PodSnapshot:
    """The task-manager pods of this cluster as last listed, and how many lists have completed."""

    def __init__(self) -> None:
        self.pods: dict[str, PodState] = {}
        self.started = 0
        """Lists started so far; each list's ticket is this count when it started."""
        self.generation = 0
        """The ticket of the list the snapshot holds. Lists may overlap (the refresh loop, a spawn),
        so only a list that *started* after a handle was made can say its pod is gone."""
        self.logs: dict[str, str] = {}
        """Log tails of ended pods (fetched once each)."""

    def ticket(self) -> int:
        """The ticket of a list about to start."""
        self.started += 1
        return self.started

    def replace(self, ticket: int, states: Sequence[PodState]) -> bool:
        """A complete list, taken unless a list that started later was taken already."""
        if ticket <= self.generation:
            return False
        self.pods = {s.name: s for s in states}
        self.generation = ticket
        self.logs = {k: v for k, v in self.logs.items() if k in self.pods}
        return True

    def newest_of(self, task_key: str) -> PodState | None:
        """The newest pod of a task key that is not being deleted (the one to adopt)."""
        live = [s for s in self.pods.values() if s.task_key == task_key and not s.deleting]
        return max(live, key=lambda s: s.created) if live else None


class KubernetesPodHandle:
    """A task manager's pod: answers from the spawner's snapshot, kills through the API."""

    pid: int | None = None
    """Pods have no process id here (their processes live in the pod's own pid namespace)."""

    def __init__(self, spawner: KubernetesSpawner, task_key: str, pod_name: str | None) -> None:
        self.spawner = spawner
        self.task_key = task_key
        self.pod_name = pod_name
        """None for an adopted key whose pod the snapshot has not shown yet (bound on first sight)."""
        self.born = spawner.snapshot.started
        """Lists started before the handle was made: only a later one can say its pod is gone."""

    def _state(self) -> PodState | None:
        snap = self.spawner.snapshot
        if self.pod_name is None:
            newest = snap.newest_of(self.task_key)
            if newest is not None:
                self.pod_name = newest.name
            return newest
        return snap.pods.get(self.pod_name)

    def exit_code(self) -> int | None:
        """None while its pod may run; its exit code once it ended; -1 once a later list lacks it."""
        state = self._state()
        if state is not None:
            return state.exit_code
        return -1 if self.spawner.snapshot.generation > self.born else None

    def log_tail(self, max_chars: int = 2000) -> str:
        """The pod's state (phase, scheduler and container reasons) and, once it ended, its log's tail."""
        state = self._state()
        if state is None:
            return f"no pod of task {self.task_key} is listed in namespace {self.spawner.settings.namespace}"
        text = state.summary()
        logs = self.spawner.snapshot.logs.get(state.name)
        if logs:
            text += "\n" + logs
        return text[-max_chars:]

    async def kill(self, grace_s: float) -> None:
        """Delete the pod (the kubelet sends SIGTERM, SIGKILL after `grace_s`); returns once it is gone."""
        if self.pod_name is None:
            await self.spawner.refresh()
            state = self._state()
            if state is None:
                return
        assert self.pod_name is not None
        await self.spawner.delete_pod(self.pod_name, grace_s)


class KubernetesSpawner:
    """Task managers as pods in one namespace, found again by their labels after a restart.

    A `NodeSpawner`: its inventory is the cluster's Nodes that run the sidecar DaemonSet
    (`k8s_nodes`), learned at `start` (the resource manager calls it before reading the inventory)
    and asked again on every `unavailable_nodes` (not Ready, or cordoned).
    """

    def __init__(
        self,
        settings: KubernetesSettings,
        *,
        log_level: str = "INFO",
        client: AsyncClient | None = None,
        kubeconfig: str | None = None,
        env: Mapping[str, str] | None = None,
        poll_s: float = 2.0,
        device_kind: DeviceKind = "auto",
        cpu_slots: int = 4,
    ) -> None:
        self.settings = settings
        self.device_kind: DeviceKind = device_kind
        self.cpu_slots = cpu_slots
        """CPU slots of a CPU node (at most its whole allocatable CPUs): the DaemonSet's sidecars per node."""
        self._devices: list[DeviceInfo] | None = None
        self._down: set[str] = set()
        self.log_level = log_level
        self.env = dict(env or {})
        """Extra ``CORNSERVE_*`` settings every task-manager pod gets."""
        self.poll_s = poll_s
        self.client = client or AsyncClient(
            config=load_config(kubeconfig),
            namespace=settings.namespace,
            timeout=httpx2.Timeout(API_TIMEOUT_S),
            field_manager="cornserve-resource-manager",
        )
        # The HTTP client logs every request at INFO: a line per pod list every `poll_s` seconds.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        self.snapshot = PodSnapshot()
        self.devices_of: Callable[[str], Sequence[DeviceInfo]] | None = None
        """The devices a task key's executors use (set by the resource manager): its pod's placement."""
        self._poller: asyncio.Task[None] | None = None

    # ----- Spawner -------------------------------------------------------------------------------

    async def spawn(self, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """Create the task manager's pod (after deleting any earlier pod of the key)."""
        self._ensure_poller()
        placement = self.placement(task_key)
        manifest = task_manager_pod(
            task_key, task, nats_url, self.settings, placement, self.log_level, self.env
        )
        await self.refresh()
        for stale in [s for s in self.snapshot.pods.values() if s.task_key == task_key]:
            logger.warning(
                "task %s: deleting its earlier pod %s before creating a new one", task_key, stale.name
            )
            await self.delete_pod(stale.name, 0.0)
        action = f"creating the task-manager pod of {task_key} in namespace {self.settings.namespace}"
        try:
            created = await self.client.create(cast(Pod, Pod.from_dict(manifest)))
        except API_ERRORS as exc:
            raise _api_error(action, exc) from exc
        name = created.metadata.name if created.metadata is not None else None
        if not name:
            raise KubernetesApiError(action, "the API's answer names no pod")
        logger.info(
            "spawned task manager for %s as pod %s (node %s, %d GPU(s))",
            task_key,
            name,
            placement.node or "any",
            placement.gpus,
        )
        handle = KubernetesPodHandle(self, task_key, name)
        await self._refresh_after(f"creating pod {name} of task {task_key}")
        return handle

    def adopt(self, task_key: str, pid: int | None) -> TaskManagerHandle:
        """The key's newest pod (pods have no pid: `pid` is ignored)."""
        self._ensure_poller()
        return KubernetesPodHandle(self, task_key, None)

    def running(self) -> list[tuple[str, TaskManagerHandle]]:
        """Every pod of this cluster in the snapshot (wanted or not) that is not being deleted.

        Ended pods too: a pod object outlives its task manager (restartPolicy Never), and listing
        it lets the orphan reaper delete the ended pods of keys no deployment wants.
        """
        self._ensure_poller()
        return [
            (s.task_key, KubernetesPodHandle(self, s.task_key, s.name))
            for s in self.snapshot.pods.values()
            if not s.deleting
        ]

    # ----- NodeSpawner ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Learn the nodes and their devices (the DaemonSet, not this, runs each node's sidecars)."""
        views = await self._node_views()
        ranks = await self._first_ranks()
        try:
            devices = inventory(views, ranks, self.device_kind, self.cpu_slots)
        except NodeError as exc:
            raise KubernetesConfigError(f"the Kubernetes node inventory is inconsistent: {exc}") from exc
        if not devices:
            raise KubernetesConfigError(
                f"no Kubernetes node offers devices: none of the {len(views)} node(s) matching "
                f"{self.settings.node_selector or 'any labels'} has a first sidecar rank in ConfigMap "
                f"{self.settings.namespace}/{self.settings.sidecar_ranks_configmap} and "
                f"{'allocatable nvidia.com/gpu' if self.device_kind == 'cuda' else 'a GPU or a whole CPU'}"
            )
        self._devices = devices
        self._down = {v.node_id for v in views if not v.up}
        logger.info(
            "Kubernetes inventory: %d device(s) on node(s) %s",
            len(devices),
            ", ".join(dict.fromkeys(d.node for d in devices)),
        )

    def node_devices(self) -> list[DeviceInfo]:
        """Every node's devices, as learned at `start`."""
        if self._devices is None:
            raise RuntimeError("KubernetesSpawner.start() must run before its inventory is read")
        return list(self._devices)

    async def unavailable_nodes(self) -> set[str]:
        """Inventory nodes that are not Ready, cordoned or gone; a failed list keeps the last answer."""
        known = {d.node for d in self._devices or ()}
        try:
            views = await self._node_views()
        except KubernetesApiError as exc:
            logger.warning("%s; node states kept as they were", exc.message)
            return set(self._down)
        up = {v.node_id for v in views if v.up}
        self._down = known - up
        return set(self._down)

    async def spawn_on(self, node: str, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """The task manager's pod, pinned to `node` (the node of its executors' devices)."""
        placement = self.placement(task_key)
        if placement.node is not None and placement.node != node:
            raise ServiceFault(
                409,
                "placement_unsupported",
                f"task {task_key}: its devices are on node {placement.node}, not {node}",
            )
        return await self.spawn(task_key, task, nats_url)

    def pids_are_local(self) -> bool:
        """Executor pids its task managers report are inside their pods, not signalable from here."""
        return False

    def one_node_per_deployment(self) -> bool:
        """A task manager forks its executors, so its pod and all their devices are on one node."""
        return True

    async def _node_views(self) -> list[NodeView]:
        action = "listing nodes"
        labels: dict[str, Any] = dict(self.settings.node_selector)
        try:
            nodes = [n.to_dict() async for n in self.client.list(Node, labels=labels)]
        except API_ERRORS as exc:
            raise _api_error(action, exc) from exc
        views: list[NodeView] = []
        for node in nodes:
            try:
                views.append(node_view(node, self.settings))
            except NodeError as exc:
                logger.warning("node left out of the inventory: %s", exc)
        return views

    async def _first_ranks(self) -> dict[str, int]:
        name = self.settings.sidecar_ranks_configmap
        action = f"reading ConfigMap {self.settings.namespace}/{name} (each node's first sidecar rank)"
        try:
            configmap = await self.client.get(ConfigMap, name, namespace=self.settings.namespace)
        except API_ERRORS as exc:
            raise _api_error(action, exc) from exc
        try:
            return first_ranks(configmap.data)
        except NodeError as exc:
            raise KubernetesConfigError(f"{action}: {exc}") from exc

    # ----- placement -----------------------------------------------------------------------------

    def placement(self, task_key: str) -> PodPlacement:
        """Node and GPU count of a key's pod, from the devices the resource manager gave its executors."""
        devices = self.devices_of(task_key) if self.devices_of is not None else ()
        try:
            return placement_of(devices)
        except PlacementError as exc:
            raise ServiceFault(409, "placement_unsupported", f"task {task_key}: {exc}") from exc

    # ----- the API -------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """List this cluster's task-manager pods into the snapshot (and fetch log tails of ended ones)."""
        action = f"listing task-manager pods in namespace {self.settings.namespace}"
        labels: dict[str, Any] = {**selector_labels(self.settings)}
        ticket = self.snapshot.ticket()
        try:
            pods = [
                p.to_dict()
                async for p in self.client.list(Pod, namespace=self.settings.namespace, labels=labels)
            ]
        except API_ERRORS as exc:
            raise _api_error(action, exc) from exc
        states = [s for s in map(pod_state, pods) if s is not None]
        if not self.snapshot.replace(ticket, states):
            return  # a list that started later is in the snapshot already
        for s in states:
            if s.exit_code is not None and s.name not in self.snapshot.logs:
                self.snapshot.logs[s.name] = await self._log_tail(s.name)

    async def _refresh_after(self, what: str) -> None:
        """Refresh after a change that succeeded; a failed list is logged, not raised.

        The change stands (raising would report it as failed), and the refresh loop lists again.
        """
        try:
            await self.refresh()
        except KubernetesApiError as exc:
            logger.warning("%s succeeded, but %s", what, exc.message)

    async def _log_tail(self, name: str) -> str:
        try:
            lines = [
                line
                async for line in self.client.log(
                    name, namespace=self.settings.namespace, tail_lines=LOG_TAIL_LINES
                )
            ]
        except API_ERRORS as exc:  # a pod that never started has no log: say so, it is no fault
            return f"(no log: {_api_error('reading its log', exc).message})"
        return "".join(lines)

    async def delete_pod(self, name: str, grace_s: float) -> None:
        """Delete a pod and wait (bounded) until the API no longer has it; force-delete if it lingers."""
        grace = max(0, math.ceil(grace_s))
        await self._delete(name, grace)
        if await self._gone(name, grace + KILL_SLACK_S):
            await self._refresh_after(f"deleting pod {name}")
            return
        logger.warning(
            "pod %s still exists %g s after its deletion; force-deleting it", name, grace + KILL_SLACK_S
        )
        await self._delete(name, 0)
        if not await self._gone(name, FORCE_DELETE_WAIT_S):
            raise KubernetesApiError(
                f"deleting pod {name}",
                f"it still exists {grace + KILL_SLACK_S + FORCE_DELETE_WAIT_S:g} s later",
            )
        await self._refresh_after(f"deleting pod {name}")

    async def _delete(self, name: str, grace: int) -> None:
        try:
            await self.client.delete(Pod, name, namespace=self.settings.namespace, grace_period=grace)
        except API_ERRORS as exc:
            if not _is_not_found(exc):
                raise _api_error(f"deleting pod {name}", exc) from exc

    async def _gone(self, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.client.get(Pod, name, namespace=self.settings.namespace)
            except API_ERRORS as exc:
                if _is_not_found(exc):
                    return True
                raise _api_error(f"reading pod {name}", exc) from exc
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # ----- the snapshot's refresh loop -----------------------------------------------------------

    def _ensure_poller(self) -> None:
        if self._poller is not None and not self._poller.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside the event loop (a test): the snapshot is refreshed by spawn/kill only
        self._poller = loop.create_task(self._poll(), name="cornserve-k8s-pods")

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except KubernetesApiError as exc:
                # The snapshot keeps its last list: handles answer "running" rather than "gone".
                logger.error("%s; listing again in %g s", exc.message, self.poll_s)
            except Exception:  # a dead loop would freeze every handle's answer: log it and go on
                logger.exception("listing task-manager pods failed; listing again in %g s", self.poll_s)
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        """Stop refreshing and close the API connection (pods keep running, for the next one to adopt)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        await self.client.close()


def task_hash_labels(task_key: str) -> dict[str, str]:
    """The label selecting one task key's pods (with the cluster's labels), e.g. for `kubectl get -l`."""
    return {LABEL_TASK_KEY_HASH: task_key_hash(task_key)}


def pod_env(environ: Mapping[str, str], names: Sequence[str]) -> dict[str, Any]:
    """The resource manager's settings that task managers inherit under the local spawner, by name."""
    return {n: environ[n] for n in names if n in environ}
