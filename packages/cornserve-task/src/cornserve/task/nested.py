"""Walking a value and everything nested inside it.

Task inputs, outputs and subtask attributes are pydantic models, lists, tuples and dicts of each
other; finding the DataForwards, Unmaterialized placeholders or subtasks in them is one walk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel


def nested_values(value: Any, *, into_models: bool = True, opaque: tuple[type, ...] = ()) -> Iterator[Any]:
    """Yield `value`, then everything inside it, depth first and in order.

    Lists, tuples and dict values are always entered; pydantic models (their declared fields) only
    with `into_models`. Instances of `opaque` are yielded but not entered.
    """
    yield value
    if isinstance(value, opaque):
        return
    if into_models and isinstance(value, BaseModel):
        children: Any = (value.__dict__.get(name) for name in type(value).model_fields)
    elif isinstance(value, (list, tuple)):
        children = value
    elif isinstance(value, dict):
        children = value.values()
    else:
        return
    for child in children:
        yield from nested_values(child, into_models=into_models, opaque=opaque)
