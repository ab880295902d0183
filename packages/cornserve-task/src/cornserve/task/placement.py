"""Where a unit task's executors may run: a pinned node or an ordered set of allowed nodes.

Additive to a task's configuration (`UnitTask.placement`, default None: any node). It is part of
the task's deployment key only when set, so tasks without it keep the keys they always had, and two
equal tasks constrained to different nodes are two deployments.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

NodeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
"""A node id as sidecars and spawner backends name nodes (letters, digits, `.`, `_`, `-`)."""


class NodePlacement(BaseModel):
    """A placement constraint: `node` pins every executor to one node; `nodes` allows a set of them.

    `nodes` is in order of preference: each executor goes to the first allowed node with enough
    free devices (after spreading replicas, see docs/architecture.md, "Nodes and placement"), so
    `nodes=["b", "a"]` means "on b while b can take it, else on a". A constraint no node of the
    inventory can satisfy makes the deploy fail with a typed error naming the nodes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: NodeName | None = None
    """Pin: every executor of the task runs on this node."""
    nodes: Annotated[list[NodeName], Field(min_length=1, max_length=256)] | None = None
    """Allowed nodes, most preferred first."""

    @model_validator(mode="after")
    def _one_form(self) -> NodePlacement:
        if (self.node is None) == (self.nodes is None):
            raise ValueError("a placement gives exactly one of `node` (a pin) or `nodes` (allowed nodes)")
        if self.nodes is not None and len(set(self.nodes)) != len(self.nodes):
            raise ValueError(f"placement.nodes names a node twice: {self.nodes}")
        return self

    @property
    def allowed(self) -> list[str]:
        """The allowed nodes, most preferred first."""
        return [self.node] if self.node is not None else list(self.nodes or [])
