"""Reading the type arguments of parametrized pydantic generic models (`Task[In, Out]`, `Stream[X]`).

A leaf module: it imports nothing from Cornserve, so every module of `cornserve.task` (and any
service) can ask "what did this class give to that generic base?" without importing the base's
module. Pydantic records a parametrization in `__pydantic_generic_metadata__`; a subclass of a
parametrization inherits it through its MRO.
"""

from __future__ import annotations

from typing import Any, TypeVar


def generic_args(cls: type, origin: type) -> tuple[Any, ...] | None:
    """The type arguments `cls` (or a base of it) gave to the generic pydantic model `origin`, if any."""
    for klass in cls.__mro__:
        meta = getattr(klass, "__pydantic_generic_metadata__", None)
        if meta and meta["origin"] is not None and issubclass(meta["origin"], origin) and meta["args"]:
            return tuple(meta["args"])
    return None


def generic_origin(cls: type) -> type:
    """The unparametrized class of a pydantic parametrization (`Stream[X]` → `Stream`), else `cls`."""
    meta = getattr(cls, "__pydantic_generic_metadata__", None) or {}
    origin = meta.get("origin")
    return origin if isinstance(origin, type) else cls


def is_concrete(cls: type) -> bool:
    """True for a class defined with a `class` statement, not a parametrization or a generic template."""
    meta = getattr(cls, "__pydantic_generic_metadata__", None) or {}
    return meta.get("origin") is None and not meta.get("parameters")


def is_unbound(arg: Any) -> bool:
    """True for a type argument that is still a type variable (the generic was not parametrized)."""
    return isinstance(arg, TypeVar)
