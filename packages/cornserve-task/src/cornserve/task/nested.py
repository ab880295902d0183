"""Walking a value and everything nested inside it.

Task inputs, outputs and subtask attributes are pydantic models, lists, tuples and dicts of each
other; finding the DataForwards, Unmaterialized placeholders or subtasks in them is one walk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

_LEAF, _MODEL, _SEQUENCE, _MAPPING = 0, 1, 2, 3
_KINDS: dict[tuple[type, tuple[type, ...]], int] = {}
"""What `nested_values` does with an instance of a type, given `opaque` (a few dozen entries in practice)."""
_KINDS_MAX = 4096


def _kind(cls: type, opaque: tuple[type, ...]) -> int:
    if opaque and issubclass(cls, opaque):
        kind = _LEAF
    elif issubclass(cls, BaseModel):
        kind = _MODEL
    elif issubclass(cls, (list, tuple)):
        kind = _SEQUENCE
    elif issubclass(cls, dict):
        kind = _MAPPING
    else:
        kind = _LEAF
    if len(_KINDS) >= _KINDS_MAX:  # classes made at run time (pydantic generics, reloaded libraries)
        _KINDS.clear()
    _KINDS[cls, opaque] = kind
    return kind


def nested_values(value: Any, *, into_models: bool = True, opaque: tuple[type, ...] = ()) -> Iterator[Any]:
    """Yield `value`, then everything inside it, depth first and in order.

    Lists, tuples and dict values are always entered; pydantic models (their declared fields) only
    with `into_models`. Instances of `opaque` are yielded but not entered.

    One loop over an explicit stack, with what to do per type looked up once, rather than nested
    generators and isinstance checks (ABC checks, for pydantic models) per value: every hop of
    every invocation walks its input and output several times (recording, wiring, checking
    streams), and the recursive form was ~7% of the gateway's CPU per request.
    """
    stack = [value]
    pop, extend = stack.pop, stack.extend
    kinds = _KINDS
    while stack:
        item = pop()
        yield item
        cls = type(item)
        kind = kinds.get((cls, opaque))
        if kind is None:
            kind = _kind(cls, opaque)
        if kind == _LEAF:
            continue
        if kind == _MODEL:
            if into_models:
                fields = item.__dict__
                extend(reversed([fields.get(name) for name in cls.__pydantic_fields__]))
        elif kind == _SEQUENCE:
            extend(reversed(item))
        else:
            extend(reversed(list(item.values())))
