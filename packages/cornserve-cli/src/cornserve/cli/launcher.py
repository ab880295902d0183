"""`cornserve up`: a whole local cluster as child processes, and `cornserve down` to stop it.

Order of start: NATS (JetStream) → one sidecar per device → resource manager → dispatchers →
gateway; stop is the reverse. Every child runs in its own process group with its log under
`<state dir>/logs`, and `<state dir>/cluster.json` records the PIDs so `cornserve down` (or a later
`up` after a crash) can find them. Task managers (and their executors) outlive a restarted resource
manager on purpose; it records them in `<state dir>/task-managers`, and stopping the cluster stops
them from there, after the resource manager and before the sidecars and NATS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cornserve.cli.admintoken import ensure_admin_token
from cornserve.cli.dockernodes import DockerConfigError, docker_spawner_config, remove_node_containers
from cornserve.cli.natsauth import (
    ADMIN,
    AUTH_DIR,
    DISPATCHER,
    EXECUTOR,
    GATEWAY,
    RESOURCE_MANAGER,
    SIDECAR,
    TASK_MANAGER,
    NatsAuth,
    create_buckets,
)
from cornserve.cli.natscluster import NatsCluster
from cornserve.cli.natsserver import NatsServerError, NatsServerProcess
from cornserve.cli.portreserve import PortInUse, PortReservation
from cornserve.runtime.detached import DetachedGroups
from cornserve.runtime.metrics import child_environment
from cornserve.runtime.nats import NatsAuthError, NatsConnectTimeout, nats_servers
from cornserve.runtime.natscreds import NatsCredentialsError
from cornserve.runtime.process import ProcessGroup, free_port, log_tail, pid_alive, signal_group, wait_for
from cornserve.runtime.secrets import SecretFileError, new_token, write_secret_file
from cornserve.runtime.statedir import default_state_dir
from cornserve.runtime.supervise import Supervised, supervise

__all__ = ["LaunchError", "LocalCluster", "default_state_dir", "read_state", "shut_down"]

STATE_FILE = "cluster.json"
SIDECAR_SECRET_FILE = "sidecar-secret"
"""The sidecars' peer secret in the state dir (0600, new at every `up`)."""
TASK_MANAGER_DIR = "task-managers"
"""The resource manager's process records of its task managers (`--task-manager-dir`)."""
DATA_PLANE_GRACE_S = 20.0
"""SIGTERM to SIGKILL of a task manager at shutdown: it stops its executors first (5 s grace each)."""
SHM_DIR = Path("/dev/shm")
NO_GATEWAY_SETTLE_S = 3.0
"""Without a gateway to report health, how long the services must stay up to count as started."""
NATS_SYNC_INTERVAL = "1s"
"""JetStream fsync interval of `up`'s NATS: the KV state (apps, task libraries, deployments) is small
and rarely written, so syncing each second costs nothing and loses at most a second of it when the
machine itself goes down (NATS's own default is 2 minutes)."""


def count_gpus() -> int:
    """CUDA devices visible to this machine (0 when torch or CUDA is missing)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


class LaunchError(RuntimeError):
    """The cluster could not be started; the message names the process and shows its log."""


@dataclass
class Child:
    """One child process of the cluster: a service, restarted in place by `LocalCluster.restart`."""

    name: str
    argv: list[str]
    log_path: Path
    proc: ProcessGroup | None = None
    env: dict[str, str] = field(default_factory=dict)
    """Variables of this child only (its NATS role's credentials), over the cluster's environment."""

    def start(self, env: dict[str, str]) -> None:
        """Spawn it in its own process group, output appended to its log file; it dies with `up`."""
        self.proc = ProcessGroup.spawn(
            self.argv, log_path=self.log_path, env={**env, **self.env}, die_with_parent=True
        )

    def exit_code(self) -> int | None:
        """None while it runs (or before it was started)."""
        return None if self.proc is None else self.proc.exit_code()

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.proc is not None and self.proc.alive()

    def log_tail(self, lines: int = 25) -> str:
        """The last `lines` lines of its log, for error messages."""
        return log_tail(self.log_path, max_chars=lines * 400, max_lines=lines)


def stop_children(children: list[Child], grace_s: float = 15.0, say: Any = print) -> None:
    """SIGTERM every child (reverse start order), wait, then SIGKILL what is left of each group."""
    for child in reversed(children):
        if child.alive() and child.proc is not None:
            say(f"  stopping {child.name}")
            child.proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in reversed(children):
        if child.proc is None:
            continue
        if child.proc.wait(max(0.1, deadline - time.monotonic())) is None:
            say(f"  {child.name} did not stop within {grace_s:.0f} s; killing it")
        child.proc.kill_group()  # also reaps grandchildren left in the group


class StopRequest:
    """SIGTERM and SIGINT turned into a flag that a supervisor loop polls."""

    def __init__(self) -> None:
        self._requested = False

    @classmethod
    def install(cls) -> StopRequest:
        """Route SIGTERM and SIGINT of this (main) thread to a new flag."""
        stop = cls()
        signal.signal(signal.SIGTERM, stop._set)
        signal.signal(signal.SIGINT, stop._set)
        return stop

    def _set(self, signum: int, frame: Any) -> None:
        self._requested = True

    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self._requested


@dataclass
class LocalCluster:
    """The processes of one local cluster."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    cpu_slots: int = 4
    dispatchers: int = 2
    nats_url: str | None = None
    nats_creds: Path | None = None
    """Credentials for an external NATS (`nats_url`), used by every service; without an external
    NATS, `start` generates one user per role instead (`cornserve.cli.natsauth`)."""
    say: Any = print
    cluster_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    children: list[Child] = field(default_factory=list)
    nats: NatsServerProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    """The environment the children were started with (for `restart`)."""
    tls_cert: Path | None = None
    """PEM certificate (and `tls_key`) for an HTTPS gateway; None serves HTTP."""
    tls_key: Path | None = None
    admin_token: str = field(default="", repr=False)
    """The gateway's admin token (set by `start`; see `cornserve.cli.admintoken`)."""
    nats_auth: NatsAuth | None = None
    """The generated per-role NATS credentials (None with an external NATS)."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Prometheus metrics page of every service (name → URL); task managers report theirs in GET /tasks."""
    nats_sync_interval: str = NATS_SYNC_INTERVAL
    """JetStream ``sync_interval`` of the embedded NATS ("default", "always" or a duration like 1s)."""
    serve_gateway: bool = True
    """Start the gateway; False for a node of a container deployment (`cornserve deploy node`), whose
    gateway and dispatchers run in containers of their own."""
    node_name: str | None = None
    """The node id of the sidecars and the resource manager (default: ``local-<cluster id>``)."""
    create_kv_buckets: bool = True
    """Create the KV buckets (with the admin role) before starting the services; False where someone
    else did (a container deployment's node never holds the admin role's credentials)."""
    nats_cluster: int = 1
    """Servers of the embedded NATS: 1, or 3 (5, 7) routed servers whose KV buckets have 3 replicas."""
    nats_servers: NatsCluster | None = None
    """The embedded NATS (None with an external one); `nats` is its first server."""
    docker_config: Path | None = None
    """`up --spawner docker --docker-config FILE`: the nodes are Docker engines; their sidecars, task
    managers and executors are containers the resource manager starts (`cornserve.cli.dockernodes`),
    and this machine runs NATS and the control plane."""
    port_reservation: PortReservation | None = field(default=None, repr=False)
    """The gateway's port, held from the start until `stop` so no child is handed it
    (`cornserve.cli.portreserve`)."""

    @property
    def url(self) -> str:
        """The gateway URL."""
        return f"{'https' if self.tls_cert is not None else 'http'}://{self.host}:{self.port}"

    def _gateway_auth_args(self) -> list[str]:
        """The admin token (env, else state-dir file, else generated) and TLS flags of the gateway."""
        try:
            token = ensure_admin_token(self.state_dir)
        except SecretFileError as exc:
            raise LaunchError(str(exc)) from None
        self.admin_token = token.value
        self.say(f"admin token: {token.where}")
        args = [] if token.file is None else ["--admin-token-file", str(token.file)]
        if self.tls_cert is not None and self.tls_key is not None:
            args += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        return args

    @property
    def node(self) -> str:
        """The node id of this cluster (sidecars with the same node share memory)."""
        return self.node_name or f"local-{self.cluster_id}"

    def _child(self, name: str, module: str, *args: str, role: str, metrics: bool = True) -> Child:
        """A service to start; `metrics`: give it a metrics port of its own (services without HTTP)."""
        log_path = self.state_dir / "logs" / f"{name}.log"
        if metrics:
            port = free_port()
            args = (*args, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
            self.metrics[name] = f"http://127.0.0.1:{port}/metrics"
        child = Child(name, [sys.executable, "-m", module, *args], log_path, env=self._nats_env(role))
        self.children.append(child)
        return child

    # ----- NATS authentication: each child gets its role's credentials (never its parent's) -------

    @property
    def nats_admin_creds(self) -> Path | None:
        """Credentials that may do anything on this cluster's NATS (operators' tools, tests)."""
        return self.nats_auth.creds(ADMIN) if self.nats_auth is not None else self.nats_creds

    def _creds(self, role: str) -> Path | None:
        return self.nats_auth.creds(role) if self.nats_auth is not None else self.nats_creds

    def _nats_env(self, role: str) -> dict[str, str]:
        if self._creds(role) is None:
            return {}
        env = {"CORNSERVE_NATS_CREDS": str(self._creds(role))}
        if role == RESOURCE_MANAGER:  # it hands these down: to task managers, they to executors
            env["CORNSERVE_TASK_MANAGER_NATS_CREDS"] = str(self._creds(TASK_MANAGER))
            env["CORNSERVE_EXECUTOR_NATS_CREDS"] = str(self._creds(EXECUTOR))
        return env

    @property
    def nats_urls(self) -> list[str]:
        """Every NATS server's URL (one for a lone server); `nats_url` is them comma-separated."""
        return nats_servers(self.nats_url) if self.nats_url is not None else []

    def _start_nats(self) -> None:
        """Start the embedded NATS or use `nats_url`; then create the KV buckets.

        An external NATS is used with one `nats_creds` file for every service, or with the per-role
        files of a `nats_auth` generated elsewhere (a container deployment, `cornserve deploy`).
        """
        replicas = 1
        if self.nats_url is None:
            servers = "" if self.nats_cluster == 1 else f" as a cluster of {self.nats_cluster} servers"
            self.say(f"starting NATS (JetStream, one user per role){servers} ...")
            self.nats_auth = NatsAuth.generate(self.state_dir / AUTH_DIR)
            (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.nats_servers = NatsCluster(
                self.nats_cluster,
                self.state_dir,
                config_file=self.nats_auth.server_config,
                sync_interval=self.nats_sync_interval,
            )
            self.nats = self.nats_servers.servers[0]
            try:
                self.nats_servers.start()
            except NatsServerError as exc:
                raise LaunchError(str(exc)) from exc
            self.nats_url = self.nats_servers.url
            replicas = self.nats_servers.replicas
        if self.create_kv_buckets and self.nats_admin_creds is not None:
            # Services may not create buckets they only read.
            try:
                create_buckets(self.nats_url, self.nats_admin_creds, replicas=replicas)
            except (NatsAuthError, NatsCredentialsError, NatsConnectTimeout, TimeoutError) as exc:
                raise LaunchError(f"cannot create the KV buckets on NATS at {self.nats_url}: {exc}") from exc

    def start(self, ready_timeout_s: float = 180.0) -> None:
        """Start everything and wait until the gateway reports healthy."""
        self._refuse_if_running()
        if self.serve_gateway and self.port_reservation is None:
            try:
                self.port_reservation = PortReservation(self.host, self.port)
            except PortInUse as exc:
                raise LaunchError(str(exc)) from None
        stop_data_plane(self.state_dir, say=self.say)  # left by an `up` that was killed: unreachable now
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._start_nats()
        assert self.nats_url is not None
        gpus = count_gpus()
        devices = gpus or self.cpu_slots
        kind = "GPU" if gpus else "CPU slot"
        self.say(f"NATS at {self.nats_url}; {devices} {kind}(s)")
        env = {
            **child_environment(dict(os.environ)),
            "CORNSERVE_NATS_URL": self.nats_url,
            "PYTHONUNBUFFERED": "1",
        }
        # The sidecars' per-cluster peer secret: they authenticate each other on the TCP data path.
        peer_secret = write_secret_file(self.state_dir / SIDECAR_SECRET_FILE, new_token())
        rm_args: list[str] = []
        if self.docker_config is not None:
            try:
                derived = docker_spawner_config(
                    self.docker_config, self.state_dir, self._creds(SIDECAR), peer_secret
                )
            except DockerConfigError as exc:
                raise LaunchError(str(exc)) from None
            rm_args += ["--spawner", "docker", "--docker-config", str(derived)]
            devices = 0  # the nodes' sidecars are containers the resource manager starts
        for rank in range(devices):
            self._child(
                f"sidecar-{rank}",
                "cornserve.sidecar.server",
                *("--rank", str(rank), "--node", self.node, "--peer-secret-file", str(peer_secret)),
                role=SIDECAR,
            )
        rm_args += ["--node", self.node, "--log-dir", str(self.state_dir / "logs")]
        rm_args += ["--task-manager-dir", str(self.state_dir / TASK_MANAGER_DIR), "--task-manager-metrics"]
        if not gpus:
            rm_args += ["--cpu-slots", str(self.cpu_slots)]
        self._child("resource-manager", "cornserve.resource_manager.main", *rm_args, role=RESOURCE_MANAGER)
        for index in range(self.dispatchers):
            self._child(
                f"dispatcher-{index}",
                "cornserve.dispatcher.main",
                "--replica-id",
                f"dispatcher-{index}",
                role=DISPATCHER,
            )
        if self.serve_gateway:
            self._child(
                "gateway", "cornserve.gateway.main", "--host", self.host, "--port", str(self.port),
                *self._gateway_auth_args(), role=GATEWAY, metrics=False,
            )  # fmt: skip
            self.metrics["gateway"] = f"{self.url}/metrics"
        self.env = {**env, "CORNSERVE_NODE": self.node}
        for child in self.children:
            self.say(f"starting {child.name}")
            child.start(self.env)
        self._write_state()
        self._wait_ready(ready_timeout_s)

    def _refuse_if_running(self) -> None:
        state = read_state(self.state_dir)
        if state is not None and pid_alive(int(state["pid"])):
            raise LaunchError(
                f"a cluster is already running from {self.state_dir} (pid {state['pid']}, {state['url']}); "
                "run `cornserve down` first or pass another --state-dir"
            )

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "url": self.url,
            "nats_url": self.nats_urls[0],  # one URL, as before: what any NATS client takes
            "nats_urls": self.nats_urls,
            "nats_auth_dir": str(self.nats_auth.directory) if self.nats_auth is not None else None,
            "node": self.node,
            "metrics": self.metrics,
            "children": [{"name": c.name, "pid": c.proc.pid} for c in self.children if c.proc is not None],
        }
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise LaunchError(
                    f"{child.name} exited during start-up; its log ({child.log_path}):\n{child.log_tail()}"
                )

    def _wait_ready(self, timeout_s: float) -> None:
        if not self.serve_gateway:  # no /health to ask: the services must survive their start
            settle = time.monotonic() + min(timeout_s, NO_GATEWAY_SETTLE_S)
            while time.monotonic() < settle:
                self._check_children()
                time.sleep(0.2)
            return
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            self._check_children()
            try:
                with urllib.request.urlopen(
                    self.url + "/health", timeout=5, context=self._probe_tls()
                ) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise LaunchError(
            f"the cluster did not become healthy within {timeout_s:.0f} s (last answer: {last})"
        )

    def _probe_tls(self) -> ssl.SSLContext | None:
        """For the readiness probe of an HTTPS gateway: trust its own certificate, whatever name it carries.

        The probe reads only the open /health route and sends no token; the certificate's name may
        not match the bind address (0.0.0.0), so only the chain is checked.
        """
        if self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_cert))
        context.check_hostname = False
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return context

    def restart(self, name: str, timeout_s: float = 10.0) -> Child:
        """Stop child `name` if it still runs (SIGTERM, then SIGKILL to its group) and start it again.

        For operators replacing a crashed service and for tests of recovery; the state file is
        updated so `cornserve down` finds the new process.
        """
        child = next((c for c in self.children if c.name == name), None)
        if child is None:
            known = ", ".join(c.name for c in self.children)
            raise LaunchError(f"no child process named {name!r} in this cluster (known: {known})")
        stop_children([child], grace_s=timeout_s, say=self.say)  # also sweeps what a dead one left
        self.say(f"restarting {child.name}")
        child.start(self.env)
        self._write_state()
        return child

    def supervise(self, should_stop: Callable[[], bool], max_restarts: int = 3, poll_s: float = 0.5) -> int:
        """Watch the children until `should_stop()`; restart one that dies, up to `max_restarts` each.

        Returns 0 when asked to stop, 1 when a child kept dying (its log tail is printed first).
        A service that crashes once (or is killed) comes back without taking the cluster down.
        """
        nats = self.nats_servers.servers if self.nats_servers is not None else []
        watched: list[Supervised] = [*nats, *self.children]
        return supervise(watched, self._restart_supervised, should_stop, max_restarts, poll_s, self.say)

    def serve_until_signal(
        self,
        ready_timeout_s: float,
        announce: Callable[[], None],
        name: str = "Cornserve",
        starting: contextlib.AbstractContextManager[object] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> int:
        """Start, `announce()`, supervise until SIGTERM or SIGINT, then stop: the life of `up` and of a node.

        The signals only set a flag, so the supervisor loop ends and the cluster stops in order
        (resource manager, data plane, services, NATS) instead of dying half-way in a handler.
        Returns 0 after a requested stop, 1 when the start failed or a child kept dying.
        """
        stop = StopRequest.install()
        report = on_error or (lambda message: self.say(f"error: {message}"))
        try:
            with starting or contextlib.nullcontext():
                self.start(ready_timeout_s=ready_timeout_s)
        except (LaunchError, KeyboardInterrupt) as exc:
            report(str(exc))
            code = 1
        else:
            announce()
            code = self.supervise(stop.requested)
        self.say(f"stopping {name} ...")
        self.stop()
        self.say("stopped")
        return code

    def _restart_supervised(self, name: str) -> None:
        """`restart` for a service; an embedded NATS server ("nats", "nats-<i>") comes back as it was."""
        nats = self.nats_servers
        if nats is None or name not in {s.name for s in nats.servers}:
            self.restart(name)
            return
        server = nats.server(name)
        label, rejoins = (
            ("NATS", "") if nats.size == 1 else (f"NATS server {name}", "; it rejoins the cluster")
        )
        self.say(
            f"restarting {label} on {server.url} (same store and credentials){rejoins}; services reconnect"
        )
        server.kill()  # sweeps what is left of its process group
        try:
            server.start()
        except NatsServerError as exc:  # counted as another death by the supervisor
            self.say(f"error: {name} did not come back: {exc}")

    def stop(self) -> None:
        """Stop every process (the data plane too), remove leftover shared memory and the state file.

        The resource manager stops first (it would re-create task managers stopped under it), then
        the task managers it recorded (each stops its executors), then the other services and NATS.
        """
        stop_children([c for c in self.children if c.name == "resource-manager"], say=self.say)
        stop_data_plane(self.state_dir, say=self.say)
        if self.docker_config is not None:
            remove_node_containers(self.state_dir, say=self.say)
        stop_children(self.children, say=self.say)
        if self.nats_servers is not None:
            self.say("  stopping NATS")
            self.nats_servers.stop()
        for leftover in SHM_DIR.glob(f"cornserve-sidecar-{self.node}-*"):
            self.say(f"  removing leftover shared memory {leftover.name}")
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STATE_FILE).unlink()
        if self.port_reservation is not None:
            self.port_reservation.close()
            self.port_reservation = None


def stop_data_plane(state_dir: Path, say: Any = print) -> None:
    """Stop the task managers recorded in the state dir (and so their executors)."""
    DetachedGroups(state_dir / TASK_MANAGER_DIR).stop_all(DATA_PLANE_GRACE_S, say=say)


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The running cluster's recorded state, if any."""
    try:
        state: dict[str, Any] = json.loads((state_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return state


def shut_down(state_dir: Path, timeout_s: float = 60.0, say: Any = print) -> bool:
    """`cornserve down`: ask the `up` process to stop everything; kill leftovers if it is gone."""
    state = read_state(state_dir)
    if state is None:
        say(f"no cluster is recorded in {state_dir}")
        return False
    pid = int(state["pid"])
    if pid_alive(pid):
        say(f"stopping the cluster (pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), timeout_s, poll_s=0.2)
    leftovers = [c for c in state.get("children", []) if pid_alive(int(c["pid"]))]
    for child in leftovers:
        say(f"  killing leftover {child['name']} (pid {child['pid']})")
        signal_group(int(child["pid"]), signal.SIGKILL)
    stop_data_plane(state_dir, say=say)
    for leftover in SHM_DIR.glob(f"cornserve-sidecar-{state.get('node', 'none')}-*"):
        leftover.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()
    say("stopped")
    return True
