"""App drivers: one run of an app's `serve` per request."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel

from cornserve.app import AppSpec
from cornserve.gateway.errors import HTTPError


def parse_request(spec: AppSpec, payload: Any) -> BaseModel:
    """Validate the request JSON against the app's request model (ValidationError → 422)."""
    return spec.request_model.model_validate(payload)


def _check_item(spec: AppSpec, item: Any) -> BaseModel:
    if isinstance(item, spec.response_model):
        return item
    if isinstance(item, BaseModel | dict):
        return spec.response_model.model_validate(item if isinstance(item, dict) else item.model_dump())
    raise HTTPError(
        500,
        "app_error",
        f"serve produced {type(item).__name__}, not its declared {spec.response_model.__name__}",
    )


async def run_unary(spec: AppSpec, request: BaseModel) -> BaseModel:
    """Run a non-streaming `serve` to its response."""
    return _check_item(spec, await spec.serve(request))


async def run_streaming(spec: AppSpec, request: BaseModel) -> AsyncGenerator[BaseModel, None]:
    """Run a streaming `serve` (an async generator, or a coroutine returning an async iterator)."""
    result = spec.serve(request)
    if inspect.isawaitable(result):
        result = await result
    if not hasattr(result, "__aiter__"):
        raise HTTPError(500, "app_error", f"serve is declared to stream but produced {type(result).__name__}")
    iterator = aiter(result)
    try:
        async for item in iterator:
            yield _check_item(spec, item)
    finally:
        # Closed now, not whenever the garbage collector finds it: closing the app's iterator is
        # what closes the relayed stream under it, which cancels the graph in the dispatcher.
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
