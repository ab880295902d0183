"""`cornserve deploy`: the steps of a container deployment (deploy/compose.yaml) that are not services.

- `init` makes the cluster's secrets in a state dir shared with the host (a bind mount): the
  per-role NATS credentials and server config (`cornserve.cli.natsauth`, as `cornserve up` makes
  them), the gateway's admin token, and the NATS config with the JetStream sync interval. Existing
  secrets are kept, so running it again (every `docker-compose up`) changes nothing; delete the
  files to rotate them. Run as root it hands the files to the containers' user (`--owner`).
- `kv` creates the cluster's KV buckets as the admin role (services may only read the buckets
  they do not own, so someone must create them before they start: `cornserve up` does it itself).
- `node` runs one node: its sidecars and the resource manager with the local spawner, so task
  managers and executors are processes of the same container (they share its /dev/shm). It is
  `cornserve up` without NATS, gateway and dispatchers (those are containers of their own),
  supervised the same way. It needs only the role files of the sidecar, resource manager, task
  manager and executor roles: a node container gets neither the admin role nor the admin token.
- `demo` builds the tiny demo checkpoint into the models volume if missing and registers the
  bundled example app as 'demo', so a fresh deployment answers `cornserve invoke demo ...`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cornserve.bus.control import ProgressEvent
from cornserve.cli.admintoken import ADMIN_TOKEN_ENV, ensure_admin_token
from cornserve.cli.bundled import DEMO_APP_FILE, MissingExampleError, example_text
from cornserve.cli.launcher import LaunchError, LocalCluster
from cornserve.cli.natsauth import (
    ADMIN,
    AUTH_DIR,
    BUCKETS,
    EXECUTOR,
    RESOURCE_MANAGER,
    SERVER_CONFIG,
    SIDECAR,
    TASK_MANAGER,
    NatsAuth,
    create_buckets,
)
from cornserve.client import CornserveClient, CornserveError
from cornserve.runtime.nats import NatsAuthError, NatsConnectTimeout
from cornserve.runtime.natscreds import NatsCredentialsError
from cornserve.runtime.secrets import SecretFileError, read_secret_file
from cornserve.runtime.statedir import admin_token_path

NATS_CONFIG = "nats.conf"
"""Under ``<state dir>/nats-auth``: the server config of the deployment's NATS (auth + JetStream)."""
DEMO_APP_NAME = "demo"
NODE_ROLES = (SIDECAR, RESOURCE_MANAGER, TASK_MANAGER, EXECUTOR)
"""The NATS roles of a node's processes: the only credential files a node container gets."""


def init_state(
    state_dir: Path,
    sync_interval: str,
    owner: tuple[int, int] | None,
    chown: tuple[Path, ...] = (),
    say: Any = print,
) -> None:
    """Create the deployment's secrets in `state_dir` (keeping existing ones) and the NATS config.

    With `owner`, the state dir (all of it) and the directories in `chown` (only themselves: the
    volumes the services write, whose contents are theirs already) are handed to that user.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    auth_dir = state_dir / AUTH_DIR
    if (auth_dir / SERVER_CONFIG).exists():
        say(f"NATS credentials: keeping {auth_dir}")
    else:
        NatsAuth.generate(auth_dir)
        say(f"NATS credentials: new, one user per role, in {auth_dir}")
    token = ensure_admin_token(state_dir)
    say(f"admin token: {token.where}")
    # The server config includes the secret one by a relative name; it holds no secret itself.
    lines = [f'include "{SERVER_CONFIG}"', "jetstream {", f"  sync_interval: {sync_interval}", "}"]
    (auth_dir / NATS_CONFIG).write_text("\n".join(lines) + "\n")
    if owner is not None:
        uid, gid = owner
        for path in [state_dir, *state_dir.rglob("*"), *chown]:
            os.chown(path, uid, gid, follow_symlinks=False)
        say(f"state dir {state_dir} belongs to {uid}:{gid}")


def create_kv(state_dir: Path, nats_url: str, timeout_s: float, say: Any = print, replicas: int = 1) -> int:
    """`cornserve deploy kv`: create the KV buckets as the admin role; existing ones are kept.

    `replicas` is each bucket's replica count: 3 on a 3-server NATS cluster (deploy/k8s).
    """
    try:
        create_buckets(
            nats_url, NatsAuth(state_dir / AUTH_DIR).creds(ADMIN), timeout_s=timeout_s, replicas=replicas
        )
    except (NatsAuthError, NatsCredentialsError, NatsConnectTimeout, TimeoutError) as exc:
        say(f"error: cannot create the KV buckets on NATS at {nats_url}: {type(exc).__name__}: {exc}")
        return 1
    say(f"KV buckets on {nats_url} ({replicas} replica(s) each): {', '.join(BUCKETS)}")
    return 0


def run_node(
    state_dir: Path, nats_url: str, node: str, cpu_slots: int, ready_timeout_s: float, say: Any = print
) -> int:
    """Run the sidecars and the resource manager of one node until SIGTERM/SIGINT; 1 if one keeps dying."""
    auth = NatsAuth(state_dir / AUTH_DIR)
    missing = [str(auth.creds(role)) for role in NODE_ROLES if not auth.creds(role).exists()]
    if missing:
        say(f"error: NATS credentials missing: {', '.join(missing)}; run `cornserve deploy init` first")
        return 2
    # The node's own records (task-manager process records, logs) live only as long as this
    # container: nothing recorded by an earlier run of it names a process that still exists.
    work_dir = Path(tempfile.mkdtemp(prefix="cornserve-node-"))
    cluster = LocalCluster(
        state_dir=work_dir, cpu_slots=cpu_slots, dispatchers=0, nats_url=nats_url, nats_auth=auth,
        serve_gateway=False, node_name=node, create_kv_buckets=False, say=say,
    )  # fmt: skip
    return cluster.serve_until_signal(
        ready_timeout_s,
        lambda: say(f"node {node} is up: {cpu_slots} CPU slot(s), logs in {work_dir / 'logs'}"),
        name=f"node {node}",
    )


def wait_healthy(url: str, timeout_s: float) -> None:
    """Wait until the gateway's /health answers 200 (the open route), or raise `LaunchError`."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(1.0)
    raise LaunchError(f"the gateway at {url} was not healthy within {timeout_s:.0f} s (last: {last})")


def ensure_demo_model(path: Path, say: Any = print) -> None:
    """Build the tiny demo checkpoint at `path` (seed 0, as `cornserve demo` does) unless it is there."""
    if (path / "config.json").exists():
        say(f"demo checkpoint: {path} (present)")
        return
    from cornserve.cli.demo import DEMO_ARCH
    from cornserve.models.tiny import build_tiny  # heavy: transformers

    say(f"building the demo checkpoint (tiny {DEMO_ARCH}, random weights) in {path} ...")
    build_tiny(DEMO_ARCH, path, seed=0)


async def register_demo(url: str, token: str) -> None:
    """Register the bundled example app as 'demo' unless an app of that name is registered."""
    async with CornserveClient(url, token=token) as client:
        if any(app.name == DEMO_APP_NAME for app in await client.list_apps()):
            print(f"app {DEMO_APP_NAME!r} is already registered")
            return
        started = time.monotonic()
        async for event in client.register_app(DEMO_APP_NAME, example_text(DEMO_APP_FILE)):
            if isinstance(event, ProgressEvent):
                print(f"  [{time.monotonic() - started:6.1f}s] {event.task_key}: {event.stage}")
        print(f"app {DEMO_APP_NAME!r} is ready ({time.monotonic() - started:.1f}s)")


def run_demo_setup(url: str, state_dir: Path, model: Path | None, timeout_s: float) -> int:
    """`cornserve deploy demo`: the checkpoint (when `model` is given), then the registration."""
    try:
        if model is not None:
            ensure_demo_model(model)
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip() or read_secret_file(admin_token_path(state_dir))
        wait_healthy(url, timeout_s)
        asyncio.run(asyncio.wait_for(register_demo(url, token), timeout_s))
    except (LaunchError, CornserveError, SecretFileError, MissingExampleError, TimeoutError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
