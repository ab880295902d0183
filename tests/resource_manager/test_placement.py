"""Nodes and placement: the inventory of nodes and their devices and the placement rules, without processes.

The rules (cornserve.resource_manager.placement): one executor's devices on one node; a task's
NodePlacement is a hard limit; replicas spread; then the constraint's order; then the node of a
task of the same owner; errors say which nodes were considered and why none fits.
"""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from cornserve.bus.control import DeviceInfo
from cornserve.bus.micro import ServiceFault
from cornserve.resource_manager.devices import DeviceInventory
from cornserve.resource_manager.placement import PlacementRequest
from cornserve.resource_manager.spawner import (
    LocalSubprocessSpawner,
    one_node_per_deployment,
    pids_are_local,
    spawner_devices,
    unavailable_nodes,
)
from cornserve.task import NodePlacement
from cornserve.task.builtins.encoder import EncoderTask
from cornserve.task.builtins.mllm import MLLMTask
from cornserve.task.builtins.modality import Modality


def nodes(**sizes: int) -> DeviceInventory:
    """An inventory of CPU slots: node name -> device count, ranks consecutive in argument order."""
    devices: list[DeviceInfo] = []
    for name, count in sizes.items():
        for i in range(count):
            devices.append(DeviceInfo(kind="cpu", index=i, sidecar_rank=len(devices), node=name))
    return DeviceInventory(devices)


def req(key: str = "t", per: int = 1, count: int = 1, **kw: object) -> PlacementRequest:
    return PlacementRequest(task_key=key, per_executor=per, count=count, **kw)  # type: ignore[arg-type]


def node_of(placed: list[list[DeviceInfo]]) -> list[str]:
    out = []
    for devs in placed:
        assert len({d.node for d in devs}) == 1, f"an executor spans nodes: {devs}"
        out.append(devs[0].node)
    return out


def test_one_executor_never_spans_nodes_even_when_enough_devices_are_free_in_total() -> None:
    inv = nodes(a=2, b=2)
    with pytest.raises(ServiceFault) as info:
        inv.place(req(per=3))
    assert info.value.code == 503 and info.value.error == "insufficient_devices"
    assert "needs 3 device(s) but only 4 of 4 are free" in info.value.message
    assert "a: 2 of 2 free; b: 2 of 2 free" in info.value.message
    assert inv.free_count() == 4  # nothing was taken by the failed placement
    assert node_of(inv.place(req(per=2))) == ["a"]


def test_replicas_spread_across_nodes() -> None:
    inv = nodes(a=4, b=4, c=4)
    placed = inv.place(req(count=3, one_node=False))
    assert sorted(node_of(placed)) == ["a", "b", "c"]
    # A scale-up continues the spread from where the running executors are.
    more = inv.place(req(count=2, placed=Counter({"a": 1, "b": 1, "c": 1}), one_node=False))
    assert len(set(node_of(more))) == 2


def test_a_backend_that_runs_executors_beside_their_task_manager_keeps_a_task_on_one_node() -> None:
    inv = nodes(a=4, b=4)
    assert len(set(node_of(inv.place(req("x", count=3, one_node=True))))) == 1
    # Its next executors join the node it is on, even though the other node is emptier.
    again = inv.place(req("x", count=1, placed=Counter({"a": 3}), one_node=True))
    assert node_of(again) == ["a"]


def test_a_pinned_task_runs_only_on_its_node_and_fails_clearly_when_that_node_is_full() -> None:
    inv = nodes(a=1, b=4)
    pin = NodePlacement(node="a")
    assert node_of(inv.place(req("one", constraint=pin))) == ["a"]
    with pytest.raises(ServiceFault) as info:
        inv.place(req("two", constraint=pin))
    assert info.value.code == 503
    assert "on 'a'" in info.value.message and "a: 0 of 1 free" in info.value.message
    assert "b:" not in info.value.message  # b was never a candidate


def test_allowed_nodes_are_tried_in_order_and_down_nodes_are_skipped() -> None:
    inv = nodes(a=2, b=2, c=2)
    prefer_b = NodePlacement(nodes=["b", "a"])
    assert node_of(inv.place(req("x", constraint=prefer_b))) == ["b"]
    inv.set_down(["b"])
    assert node_of(inv.place(req("y", constraint=prefer_b))) == ["a"]
    inv.set_down(["b", "a"])
    with pytest.raises(ServiceFault) as info:
        inv.place(req("z", constraint=prefer_b))
    assert "b: down" in info.value.message and "a: down" in info.value.message


def test_a_constraint_naming_only_unknown_nodes_is_a_bad_request() -> None:
    inv = nodes(a=1)
    with pytest.raises(ServiceFault) as info:
        inv.place(req(constraint=NodePlacement(node="nowhere")))
    assert info.value.code == 400 and info.value.error == "bad_placement"
    assert "'nowhere'" in info.value.message and "'a'" in info.value.message


def test_a_consumer_prefers_the_node_of_its_owners_other_tasks() -> None:
    inv = nodes(a=2, b=3)
    # Without affinity the emptier node wins; with it, the node holding the app's producer.
    assert node_of(inv.place(req("free", one_node=False))) == ["b"]
    inv = nodes(a=2, b=3)
    assert node_of(inv.place(req("llm", affinity=frozenset({"a"})))) == ["a"]
    # Affinity never beats a constraint.
    inv = nodes(a=2, b=3)
    placed = inv.place(req("llm", affinity=frozenset({"a"}), constraint=NodePlacement(node="b")))
    assert node_of(placed) == ["b"]


def test_devices_of_a_down_node_are_neither_allocated_nor_claimed() -> None:
    inv = nodes(a=1, b=1)
    went, came = inv.set_down(["b", "unknown"])
    assert went == {"b"} and came == set() and inv.down == frozenset({"b"})
    b_dev = DeviceInfo(kind="cpu", index=0, sidecar_rank=1, node="b")
    assert inv.claim("t", [b_dev]) == [b_dev]
    assert [d.node for d in inv.allocate("t", 1)] == ["a"]
    went, came = inv.set_down([])
    assert came == {"b"}
    assert inv.claim("u", [b_dev]) == [] and inv.node_of("u") == ["b"]


def test_an_inventory_refuses_duplicate_ranks() -> None:
    dup = [
        DeviceInfo(kind="cpu", index=0, sidecar_rank=0, node="a"),
        DeviceInfo(kind="cpu", index=0, sidecar_rank=0, node="b"),
    ]
    with pytest.raises(ValueError, match="share a sidecar rank"):
        DeviceInventory(dup)


def test_node_placement_is_validated_and_part_of_the_key_only_when_set() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        NodePlacement(node="a", nodes=["b"])
    with pytest.raises(ValidationError, match="twice"):
        NodePlacement(nodes=["a", "a"])
    with pytest.raises(ValidationError):
        NodePlacement(node="has space")
    plain = EncoderTask(modality=Modality.IMAGE, model_id="/m")
    pinned = EncoderTask(modality=Modality.IMAGE, model_id="/m", placement={"node": "a"})
    assert "placement" not in plain.model_dump()
    assert plain.deployment_key != pinned.deployment_key
    mllm = MLLMTask(model_id="/m", encoder_placement={"node": "a"}, llm_placement={"nodes": ["b", "a"]})
    assert mllm.encoders[Modality.IMAGE].placement == NodePlacement(node="a")
    assert mllm.llm.placement is not None and mllm.llm.placement.allowed == ["b", "a"]


async def test_a_one_node_spawner_gets_the_defaults(tmp_path: object) -> None:
    from pathlib import Path

    spawner = LocalSubprocessSpawner(Path(str(tmp_path)))
    local = [DeviceInfo(kind="cpu", index=0, sidecar_rank=0, node="here")]
    assert spawner_devices(spawner, lambda: local) == local
    assert await unavailable_nodes(spawner) == set()
    assert pids_are_local(spawner) and one_node_per_deployment(spawner)
