"""Streamed task outputs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from pydantic import PrivateAttr

from cornserve.task.base import TaskOutput
from cornserve.task.errors import StaticGraphError, UnmaterializedDataError

ItemT = TypeVar("ItemT")
NewItemT = TypeVar("NewItemT")


class Stream(TaskOutput, Generic[ItemT]):
    """A task output that arrives item by item (e.g. LLM chunks); iterate it with `async for`.

    While a graph is recorded the stream is a placeholder with no source; `transform` still works
    (the function is applied once the real stream flows). A stream can be iterated once.
    """

    _source: AsyncIterator[Any] | None = PrivateAttr(default=None)
    _transforms: tuple[Callable[[Any], Any], ...] = PrivateAttr(default=())
    _consumed: bool = PrivateAttr(default=False)
    _producer: str = PrivateAttr(default="a task")

    @classmethod
    def from_iterator(cls, source: AsyncIterator[Any]) -> Stream[Any]:
        """Wrap a real async iterator of items."""
        stream = cls()
        stream._source = source
        return stream

    @classmethod
    def placeholder(cls, producer: str) -> Stream[Any]:
        """The recorded stand-in for a stream that does not exist yet."""
        stream = cls()
        stream._producer = producer
        return stream

    @property
    def is_placeholder(self) -> bool:
        """True while recording: the stream has no source to read yet."""
        return self._source is None

    def transform(self, fn: Callable[[ItemT], NewItemT]) -> Stream[NewItemT]:
        """A new stream whose items are `fn(item)`; lazy, so it also works while recording."""
        out: Stream[NewItemT] = Stream()
        out._source = self._source
        out._transforms = (*self._transforms, fn)
        out._producer = self._producer
        if self._source is not None:
            self._consumed = True  # ownership of the source moves to the new stream
        return out

    def __aiter__(self) -> AsyncIterator[ItemT]:
        if self._source is None:
            raise UnmaterializedDataError(
                f"the stream produced by {self._producer} was iterated while recording the task graph; "
                "a stream can only be read after `await task(...)` returns"
            )
        if self._consumed:
            raise StaticGraphError(f"the stream produced by {self._producer} was already consumed")
        self._consumed = True
        return self._iterate(self._source)

    async def _iterate(self, source: AsyncIterator[Any]) -> AsyncIterator[ItemT]:
        try:
            async for item in source:
                for fn in self._transforms:
                    item = fn(item)
                yield item
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
