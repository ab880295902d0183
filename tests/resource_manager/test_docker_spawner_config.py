"""The docker spawner's config and inventory, without an engine (the engine tests are tests/docker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cornserve.resource_manager.docker_config import DockerSpawnerConfig
from cornserve.resource_manager.docker_spawner import DockerSpawner
from cornserve.resource_manager.main import make_spawner
from cornserve.resource_manager.spawner import (
    NodeSpawner,
    one_node_per_deployment,
    pids_are_local,
    spawner_devices,
)
from cornserve.sidecar.server import SidecarSettings


def config(**extra: object) -> DockerSpawnerConfig:
    nodes = [
        {"name": "gpu-box", "engine": "tcp://10.0.0.5:2376", "address": "10.0.0.5",
         "devices": {"kind": "cuda", "count": 2, "memory_bytes": 80 << 30}},
        {"name": "cpu-box", "devices": {"kind": "cpu", "count": 3}},
    ]  # fmt: skip
    return DockerSpawnerConfig.model_validate({"nodes": nodes, **extra})


def test_the_inventory_is_every_nodes_devices_with_cluster_wide_ranks(tmp_path: Path) -> None:
    spawner = DockerSpawner(config(), tmp_path)
    assert isinstance(spawner, NodeSpawner)
    devices = spawner_devices(spawner, lambda: pytest.fail("a node spawner is not discovered locally"))
    assert [(d.node, d.kind, d.index, d.sidecar_rank) for d in devices] == [
        ("gpu-box", "cuda", 0, 0), ("gpu-box", "cuda", 1, 1),
        ("cpu-box", "cpu", 0, 2), ("cpu-box", "cpu", 1, 3), ("cpu-box", "cpu", 2, 4),
    ]  # fmt: skip
    assert devices[0].memory_bytes == 80 << 30 and devices[2].memory_bytes is None
    assert not pids_are_local(spawner) and not one_node_per_deployment(spawner)  # executors: own containers


def test_a_bad_config_is_refused_with_the_field_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="unique"):
        DockerSpawnerConfig.model_validate({"nodes": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValidationError, match="nodes"):
        DockerSpawnerConfig.model_validate({"nodes": []})
    with pytest.raises(ValidationError, match="engnie"):
        DockerSpawnerConfig.model_validate({"nodes": [{"name": "a", "engnie": "unix:///x"}]})
    with pytest.raises(ValueError, match="--docker-config"):
        make_spawner("docker", tmp_path, "INFO")
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps({"nodes": [{"name": "a"}]}))
    spawner = make_spawner("docker", tmp_path, "INFO", docker_config=path)
    assert isinstance(spawner, DockerSpawner) and [d.node for d in spawner.node_devices()] == ["a"]


def test_a_sidecar_binding_every_address_must_advertise_a_routable_one() -> None:
    with pytest.raises(ValidationError, match="--advertise-host"):
        SidecarSettings(rank=0, node="n", tcp_host="0.0.0.0")
    s = SidecarSettings(rank=0, node="n", tcp_host="0.0.0.0", advertise_host="10.0.0.5")
    assert s.advertise_host == "10.0.0.5"
