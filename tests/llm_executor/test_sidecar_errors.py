"""One mapping of sidecar failures to the executor's request errors (`cornserve.llm_executor.sidecar_errors`)."""

from __future__ import annotations

import pytest

from cornserve.llm_executor.errors import (
    EmbeddingError,
    EmbeddingTimeout,
    ExecutorRequestError,
    ExecutorUnavailable,
    GenerationFailed,
)
from cornserve.llm_executor.sidecar_errors import sidecar_errors
from cornserve.sidecar.errors import (
    DataDropped,
    MemoryPressure,
    RecvTimeout,
    SidecarTimeout,
    SidecarUnavailable,
)


@pytest.mark.parametrize(
    ("raised", "expected", "status"),
    [
        (RecvTimeout("chunk 3 did not arrive"), EmbeddingTimeout, 504),
        (SidecarTimeout("rank 2 did not answer"), EmbeddingTimeout, 504),
        (TimeoutError(), EmbeddingTimeout, 504),
        (SidecarUnavailable("rank 2 is not running"), ExecutorUnavailable, 503),
        (DataDropped("its graph was given up"), EmbeddingError, 400),
    ],
)
def test_each_sidecar_failure_is_the_request_error_with_its_status(
    raised: Exception, expected: type[ExecutorRequestError], status: int
) -> None:
    with pytest.raises(expected) as caught, sidecar_errors("forward f timed out", "forward f failed"):
        raise raised
    assert caught.value.status == status
    if expected is EmbeddingTimeout:
        assert caught.value.message == "forward f timed out"
    else:
        assert str(raised) in caught.value.message


def test_a_send_failure_is_the_callers_class_and_its_message_is_made_when_it_happens() -> None:
    sent = 0

    def failed() -> str:
        return f"chunk {sent} could not be sent"

    with pytest.raises(GenerationFailed) as caught, sidecar_errors("late", failed, GenerationFailed):
        sent = 7
        raise MemoryPressure("no room for 256 bytes")
    assert caught.value.status == 500
    assert caught.value.message == "chunk 7 could not be sent: no room for 256 bytes"
    assert isinstance(caught.value.__cause__, MemoryPressure)


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError), sidecar_errors("late", "failed"):
        raise KeyError("not a sidecar error")
