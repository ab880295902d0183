"""`cornserve up --spawner docker`: the docker spawner's config as `up` hands it to the resource manager.

The user's file names the nodes (engine, address, devices) and the image; `up` adds what only it
knows: the state dir bound into every container (NATS credentials, the sidecar peer secret, logs),
the sidecar role's credentials and the peer secret. The result is written next to the cluster's
state (`<state dir>/docker-spawner.json`), so `down` removes the same containers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cornserve.resource_manager.docker_config import DockerSpawnerConfig
from cornserve.resource_manager.docker_spawner import DockerSpawner

DERIVED_FILE = "docker-spawner.json"
REMOVE_DEADLINE_S = 120.0


class DockerConfigError(ValueError):
    """The docker spawner's config file cannot be read or is invalid (the message says which field)."""


def docker_spawner_config(
    source: Path, state_dir: Path, sidecar_creds: Path | None, peer_secret: Path
) -> Path:
    """Write `<state dir>/docker-spawner.json`: `source` plus the state dir, credentials and secret."""
    try:
        config = DockerSpawnerConfig.load(source)
    except (OSError, ValidationError) as exc:
        raise DockerConfigError(f"--docker-config {source}: {exc}") from None
    derived = config.model_copy(
        update={
            "mounts": list(dict.fromkeys([*config.mounts, state_dir.resolve()])),
            "sidecar_nats_creds": sidecar_creds,
            "sidecar_peer_secret_file": peer_secret,
        }
    )
    path = state_dir / DERIVED_FILE
    path.write_text(derived.model_dump_json(indent=2))
    return path


def remove_node_containers(state_dir: Path, say: Any = print) -> None:
    """Remove every container of the cluster on every node (task managers, sidecars, IPC holders)."""
    path = state_dir / DERIVED_FILE
    if not path.exists():
        return
    config = DockerSpawnerConfig.load(path)
    spawner = DockerSpawner(config, state_dir / "logs")
    say(f"  removing the containers of {config.cluster} on {', '.join(n.name for n in config.nodes)}")

    async def remove() -> None:
        await asyncio.wait_for(spawner.remove_all(), REMOVE_DEADLINE_S)

    try:
        asyncio.run(remove())
    except Exception as exc:  # an engine that does not answer: say so, the rest of `down` goes on
        say(f"  could not remove every container of {config.cluster}: {type(exc).__name__}: {exc}")
