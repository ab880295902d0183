"""Placeholders for data that moves between executors instead of through the app driver."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, Generic, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cornserve.task.errors import UnmaterializedDataError
from cornserve.task.generics import generic_args
from cornserve.task.nested import nested_values

DataT = TypeVar("DataT")


class Tensor:
    """Marker type: the forwarded data is a tensor (torch on executors, shared memory in between)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)


def _refuse_contents(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
    raise UnmaterializedDataError(
        f"DataForward {self.id} ({self.data_type}) has no contents in the app driver: its data travels "
        "from the producing executor to the consuming executors through the sidecar. Pass the "
        "DataForward itself to the consuming task's input instead of reading it."
    )


class DataForward(BaseModel, Generic[DataT]):
    """A handle to one piece of intermediate data forwarded between executors through the sidecar.

    The producer's output holds a DataForward and a consumer's input reuses the very same one: that
    reuse is an edge of the task graph. The graph runner fills in the sidecar ranks before execution.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    data_type: str = ""
    src_sidecar_ranks: list[int] | None = None
    dst_sidecar_ranks: list[list[int]] | None = None

    def model_post_init(self, context: Any) -> None:
        """Record the forwarded type (`DataForward[Tensor]` → "Tensor") for executors and graph pictures."""
        if not self.data_type:
            args = generic_args(type(self), DataForward)
            self.data_type = _type_name(args[0]) if args else "Any"

    def __hash__(self) -> int:
        return hash(self.id)

    __bool__ = _refuse_contents
    __len__ = _refuse_contents
    __iter__ = _refuse_contents
    __getitem__ = _refuse_contents
    __float__ = _refuse_contents
    __int__ = _refuse_contents
    __index__ = _refuse_contents
    __add__ = _refuse_contents
    __radd__ = _refuse_contents
    __sub__ = _refuse_contents
    __mul__ = _refuse_contents
    __rmul__ = _refuse_contents
    __matmul__ = _refuse_contents
    __truediv__ = _refuse_contents
    __lt__ = _refuse_contents
    __gt__ = _refuse_contents
    __array__ = _refuse_contents

    @property
    def data(self) -> NoReturn:
        """Always refused: forwarded data never reaches the app driver."""
        _refuse_contents(self)


class Unmaterialized:
    """A recorded output field whose value only exists after the graph has run.

    Any attempt to use it while recording — compare it, branch on it, format it — raises
    `UnmaterializedDataError`, which is how the static-graph rule is enforced for plain values.
    """

    __slots__ = ("_field", "_task_name")

    def __init__(self, task_name: str, field: str) -> None:
        self._task_name = task_name
        self._field = field

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise self._error()

    def _error(self) -> UnmaterializedDataError:
        """What using it raises (a traced output says something else: `cornserve.task.local`)."""
        return UnmaterializedDataError(
            f"Output field {self._field!r} of {self._task_name} was used while recording the task graph, "
            "before it exists. The graph must be determined by the request alone: do not branch on or "
            "compute with task outputs inside invoke(); only pass DataForwards on to other tasks."
        )

    def __repr__(self) -> str:
        return f"<unmaterialized output {self._field!r} of {self._task_name}>"

    __bool__ = _refuse
    __eq__ = _refuse
    __ne__ = _refuse
    __lt__ = _refuse
    __gt__ = _refuse
    __len__ = _refuse
    __iter__ = _refuse
    __getitem__ = _refuse
    __contains__ = _refuse
    __str__ = _refuse
    __format__ = _refuse
    __int__ = _refuse
    __float__ = _refuse
    __index__ = _refuse
    __add__ = _refuse
    __radd__ = _refuse
    __mul__ = _refuse
    __hash__ = _refuse

    def __getattr__(self, name: str) -> NoReturn:
        self._refuse()


def iter_forwards(value: Any) -> Iterator[DataForward[Any]]:
    """Yield every DataForward inside a value (models, lists, tuples, dicts), in field order."""
    for item in nested_values(value, opaque=(DataForward,)):
        if isinstance(item, DataForward):
            yield item
