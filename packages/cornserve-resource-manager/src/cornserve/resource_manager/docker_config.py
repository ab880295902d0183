"""The docker spawner's config file (`--docker-config FILE`, JSON): its nodes and how containers run.

Validated by pydantic before anything starts, so a typo names its field; the spawner itself is
`docker_spawner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class NodeDevices(BaseModel):
    """A node's devices: `count` CPU slots, or GPUs with their memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cpu", "cuda"] = "cpu"
    count: int = Field(default=1, ge=1, le=1024)
    memory_bytes: int | None = Field(default=None, ge=0)
    """Each device's memory (GPUs), reported in the inventory."""


class DockerNode(BaseModel):
    """One node: its engine, the address its sidecars and executors are reached at, its devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    engine: str = "unix:///var/run/docker.sock"
    """The node's Docker engine, as DOCKER_HOST would name it."""
    address: str = "127.0.0.1"
    """Routable address of this node for other nodes (sidecar TCP, executor HTTP)."""
    bind_host: str | None = None
    """Address the sidecars' TCP listeners bind (default: `address`; `0.0.0.0` for every interface)."""
    devices: NodeDevices = NodeDevices()
    shm_bytes: int = Field(default=1 << 30, gt=0)
    """Size of the node's /dev/shm (must hold its sidecars' arenas plus what executors allocate)."""


class DockerSpawnerConfig(BaseModel):
    """`--docker-config FILE` (JSON) of the resource manager: the nodes and how containers run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cluster: str = Field(default="cornserve", pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    """Prefix of every container name and value of its cluster label (several clusters per engine)."""
    image: str = "cornserve-node:latest"
    """The image of task managers and sidecars (deploy/docker/build.sh's node image)."""
    nodes: list[DockerNode] = Field(min_length=1)
    mounts: list[Path] = Field(default_factory=list)
    """Host paths bound at the same path in every container (credentials, logs, models)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment of every container (besides the resource manager's CORNSERVE_* variables)."""
    user: str | None = None
    """`uid:gid` the containers run as (default: the resource manager's own)."""
    arena_bytes: int = Field(default=256 << 20, gt=0)
    """Each sidecar's arena (CORNSERVE_ARENA_BYTES)."""
    sidecar_nats_creds: Path | None = None
    """The sidecar role's NATS credentials file."""
    sidecar_peer_secret_file: Path | None = None
    """The cluster's sidecar peer secret (without it, no cross-node transfers)."""
    engine_timeout_s: float = Field(default=20.0, gt=0, le=600)
    """Timeout of one Docker Engine API call."""

    @model_validator(mode="after")
    def _unique_nodes(self) -> DockerSpawnerConfig:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        return self

    @classmethod
    def load(cls, path: Path) -> DockerSpawnerConfig:
        """Read and validate the JSON file (a typed pydantic error names the bad field)."""
        return cls.model_validate_json(path.read_text())
