"""The base classes of every task's input and output models.

Kept apart from the task classes so the modules that only move inputs and outputs around (streams,
invocations, graph runners) do not depend on the task classes themselves.
"""

from __future__ import annotations

from pydantic import BaseModel


class TaskInput(BaseModel):
    """Base class of every task's input model."""


class TaskOutput(BaseModel):
    """Base class of every task's output model."""
