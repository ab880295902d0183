"""Log lines: text or JSON by setting, each carrying the service, the current request id and trace ids."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import pytest

from cornserve.runtime.logging import configure_logging, request_context, set_request_id
from cornserve.runtime.tracing import server_span


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_json_lines_carry_request_id_and_service(
    restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json", service="svc-a")
    log = logging.getLogger("cornserve.somewhere")
    log.info("outside")
    with request_context("req-1"):
        log.info("inside %d", 1)

        async def spawned() -> None:
            log.warning("in a task created inside the request")

        await asyncio.create_task(spawned())
    log.debug("filtered out by level")

    async def one_request() -> None:
        set_request_id("req-2")
        log.error("boom")

    await asyncio.create_task(one_request())
    log.info("after")  # the task's id did not leak out of it
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(x["message"], x["request_id"]) for x in lines] == [
        ("outside", None),
        ("inside 1", "req-1"),
        ("in a task created inside the request", "req-1"),
        ("boom", "req-2"),
        ("after", None),
    ]
    assert {x["service"] for x in lines} == {"svc-a"}
    assert lines[1]["logger"] == "cornserve.somewhere" and lines[1]["level"] == "INFO"


def test_text_lines_and_exceptions(restore_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", "text", service="svc-b")
    with request_context("req-9"):
        logging.getLogger("x").debug("hello")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("x").exception("failed")
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("DEBUG svc-b x [req-9]: hello")
    assert err[1].endswith("ERROR svc-b x [-]: failed") and "ValueError: bad" in err[-1]
    configure_logging("INFO", "json", service="svc-b")  # replaces, never adds, a handler
    assert len(logging.getLogger().handlers) == 1
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("x").exception("failed")
    (line,) = capsys.readouterr().err.splitlines()
    assert "ValueError: bad" in json.loads(line)["exc"]


def test_lines_inside_a_span_carry_its_trace_and_span_ids(
    restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # A caller's context: even without an installed provider it is the current span inside the block.
    caller = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    configure_logging("INFO", "json", service="svc-c")
    log = logging.getLogger("y")
    with request_context("req-t"), server_span("handle", caller):
        log.info("inside")
    log.info("outside")
    inside, outside = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert inside["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and inside["request_id"] == "req-t"
    assert inside["span_id"] == "b7ad6b7169203331"
    assert "trace_id" not in outside and "span_id" not in outside
    configure_logging("INFO", "text", service="svc-c")
    with request_context("req-t"), server_span("handle", caller):
        log.info("inside")
    log.info("outside")
    inside_text, outside_text = capsys.readouterr().err.splitlines()
    assert inside_text.endswith("svc-c y [req-t t=0af76519]: inside")
    assert outside_text.endswith("svc-c y [-]: outside")
