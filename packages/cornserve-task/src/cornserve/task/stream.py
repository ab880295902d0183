"""Streamed task outputs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from pydantic import ConfigDict, Field

from cornserve.task.errors import StaticGraphError, UnmaterializedDataError
from cornserve.task.forward import DataForward
from cornserve.task.generics import generic_args, is_unbound
from cornserve.task.io_models import TaskOutput

ItemT = TypeVar("ItemT")
NewItemT = TypeVar("NewItemT")


class StreamHandle:
    """The state of one stream, shared by every copy of the Stream model that pydantic makes.

    Pydantic re-creates a `Stream` when one is placed in a field typed `Stream[X]`; keeping the
    source and the consumed flag in one shared object makes those copies the same stream.
    """

    __slots__ = ("consumed", "position", "producer", "source", "transforms")

    def __init__(
        self,
        source: AsyncIterator[Any] | None = None,
        transforms: tuple[Callable[[Any], Any], ...] = (),
        producer: str = "a task",
        position: int | None = None,
    ) -> None:
        self.source = source
        self.transforms = transforms
        self.producer = producer
        self.position = position
        """The recorded invocation that produces it (kept by `transform`), so the static-graph check
        can tell the graph's result stream from a stream nobody reads."""
        self.consumed = False


class Stream(TaskOutput, Generic[ItemT]):
    """A task output that arrives item by item (e.g. LLM chunks); iterate it once with `async for`.

    While a graph is recorded the stream is a placeholder with no source; `transform` still works
    (the function is applied once the real stream flows).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    handle: StreamHandle = Field(default_factory=StreamHandle, exclude=True, repr=False)

    @classmethod
    def item_type(cls) -> Any:
        """The item type X of `Stream[X]` (or of a subclass of it); `Any` for an unparametrized Stream.

        The one answer to "what does this stream carry" for everyone who validates or serializes
        stream items (executors, the gateway's dispatcher client, notebook sessions):
        `TypeAdapter(output_cls.item_type())` validates an item, and for `Any` passes it through.
        """
        args = generic_args(cls, Stream)
        if not args or is_unbound(args[0]):
            return Any
        return args[0]

    @classmethod
    def from_iterator(cls, source: AsyncIterator[Any]) -> Stream[Any]:
        """Wrap a real async iterator of items."""
        return cls(handle=StreamHandle(source=source))

    @classmethod
    def placeholder(cls, producer: str) -> Stream[Any]:
        """The recorded stand-in for a stream that does not exist yet."""
        return cls(handle=StreamHandle(producer=producer))

    @property
    def is_placeholder(self) -> bool:
        """True while recording: the stream has no source to read yet."""
        return self.handle.source is None

    def transform(self, fn: Callable[[ItemT], NewItemT]) -> Stream[NewItemT]:
        """A new stream whose items are `fn(item)`; lazy, so it also works while recording."""
        handle = self.handle
        if handle.source is not None:
            if handle.consumed:
                raise StaticGraphError(f"the stream produced by {handle.producer} was already consumed")
            handle.consumed = True  # the source now belongs to the new stream
        new = StreamHandle(
            source=handle.source,
            transforms=(*handle.transforms, fn),
            producer=handle.producer,
            position=handle.position,
        )
        return Stream[NewItemT](handle=new)

    def __aiter__(self) -> AsyncIterator[ItemT]:
        handle = self.handle
        if handle.source is None:
            raise UnmaterializedDataError(
                f"the stream produced by {handle.producer} was iterated while recording the task graph; "
                "a stream can only be read after `await task(...)` returns"
            )
        if handle.consumed:
            raise StaticGraphError(f"the stream produced by {handle.producer} was already consumed")
        handle.consumed = True
        return self._iterate(handle.source, handle.transforms)

    async def _iterate(
        self, source: AsyncIterator[Any], transforms: tuple[Callable[[Any], Any], ...]
    ) -> AsyncIterator[ItemT]:
        try:
            async for item in source:
                for fn in transforms:
                    item = fn(item)
                yield item
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        """Close the underlying source without reading it (e.g. when the caller gives up)."""
        source = self.handle.source
        self.handle.consumed = True
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


def is_stream_forward(forward: DataForward[Any]) -> bool:
    """Whether a forward carries a stream (`DataForward[Stream[T]]`) rather than one value.

    A stream forward travels chunk by chunk through the sidecar: chunk i is item i, and the
    producer ends it with `close_stream` (docs/tasks.md, "Streams between tasks"). The static-graph
    check gives every stream forward exactly one consumer.
    """
    return forward.data_type == "Stream" or forward.data_type.startswith("Stream[")
