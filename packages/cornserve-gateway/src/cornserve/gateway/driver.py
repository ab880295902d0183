"""App drivers: one run of an app's `serve` per request."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from cornserve.app import AppSpec
from cornserve.gateway.errors import HTTPError
from cornserve.task.builtins import ChatCompletionRequest

INTERNAL_FIELDS = ("cornserve_embeddings",)
"""Fields of a `ChatCompletionRequest` only tasks inside a graph set (forward ids of another task's
outputs): refused from callers, so no request can name data that belongs to another."""


def parse_request(spec: AppSpec, payload: Any) -> BaseModel:
    """Validate the request JSON against the app's request model (ValidationError → 422).

    An app that takes a chat request (and may hand it on to an LLM task as it is) gets no internal
    field from its caller: 400.
    """
    if isinstance(payload, dict) and issubclass(spec.request_model, ChatCompletionRequest):
        for name in INTERNAL_FIELDS:
            if name in payload:
                raise HTTPError(
                    400,
                    "invalid_request",
                    f'"{name}" is set by Cornserve\'s tasks, not by callers',
                    {"param": name},
                )
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


T = TypeVar("T")


async def first_item(
    items: AsyncGenerator[T, None], deadline: float, timed_out: Callable[[], HTTPError]
) -> T | None:
    """The first item of a stream within `deadline` (the loop's clock); None when it is empty.

    Before the first item a failure is still a plain HTTP error (no stream has started): on any
    failure `items` is closed, and past the deadline `timed_out()` is raised instead of TimeoutError.
    """
    limit = asyncio.timeout_at(deadline)
    try:
        async with limit:
            return await anext(items)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        await items.aclose()
        if limit.expired():
            raise timed_out() from None
        raise
    except BaseException:
        await items.aclose()
        raise
