"""Sidecar failures as the executor's typed request errors, in one place for every role that uses it.

Encoder embeddings in (`embeddings.py`), hidden states out (`hidden_states.py`) and input embeddings
in (`input_embeds.py`) all talk to this executor's sidecar; what a client is told must not depend on
which of them failed:

- a deadline (the sidecar's `RecvTimeout` / `SidecarTimeout`, or an `asyncio.timeout` around the
  call): `EmbeddingTimeout`, 504, the data did not come (or could not go) in time;
- the sidecar is not running or NATS is gone (`SidecarUnavailable`): `ExecutorUnavailable`, 503;
- any other sidecar error (dropped, lost, no room, bad data): the caller's `failure` class (400
  `EmbeddingError` by default for data that came in wrong, 500 `GenerationFailed` for a send).

Messages are given as strings or as functions called only when that error happens (a message that
names how far a stream got is read at that moment).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cornserve.llm_executor.errors import (
    EmbeddingError,
    EmbeddingTimeout,
    ExecutorRequestError,
    ExecutorUnavailable,
)
from cornserve.sidecar.errors import SidecarError, SidecarUnavailable

Message = str | Callable[[], str]
"""A message, or a function that makes it when the error happens."""


def _text(message: Message) -> str:
    return message if isinstance(message, str) else message()


@contextmanager
def sidecar_errors(
    timed_out: Message, failed: Message, failure: type[ExecutorRequestError] = EmbeddingError
) -> Iterator[None]:
    """Raise the request error of a sidecar failure in the block (the sidecar's error chained).

    `timed_out` is the whole message of a deadline; `failed` says what failed, and the sidecar's
    own message follows it (`"<failed>: <sidecar message>"`).
    """
    try:
        yield
    except TimeoutError:  # RecvTimeout and SidecarTimeout are TimeoutErrors too
        raise EmbeddingTimeout(_text(timed_out)) from None
    except SidecarUnavailable as exc:
        raise ExecutorUnavailable(f"this executor's sidecar is not reachable: {exc}") from exc
    except SidecarError as exc:
        raise failure(f"{_text(failed)}: {exc}") from exc
