"""The base classes of every task's input and output models.

Kept apart from the task classes so the modules that only move inputs and outputs around (streams,
invocations, graph runners) do not depend on the task classes themselves.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)


class TaskInput(BaseModel):
    """Base class of every task's input model."""


class TaskOutput(BaseModel):
    """Base class of every task's output model."""


def as_model(value: Any, model_cls: type[ModelT]) -> ModelT | None:
    """`value` as a `model_cls`: itself, or validated from a dict of its fields; None for anything else.

    Task code may hand over inputs and outputs either as models or as plain dicts.
    """
    if isinstance(value, model_cls):
        return value
    if isinstance(value, dict):
        return model_cls.model_validate(value)
    return None
