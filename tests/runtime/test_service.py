"""`run_service` / `run_executor` as real processes: signals, drain deadlines and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cornserve.runtime.process import free_port

DEMO = Path(__file__).with_name("demo_service.py")


def start(kind: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(DEMO), kind, "--log-format", "json", *argv],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 20) -> list[dict[str, object]]:
    """Read JSON log lines until one's message contains `needle`."""
    assert proc.stderr is not None
    lines: list[dict[str, object]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = proc.stderr.readline()
        if not raw:
            break
        lines.append(json.loads(raw))
        if needle in str(lines[-1]["message"]):
            return lines
    raise AssertionError(f"no {needle!r} in {lines}")


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigterm_drains_and_exits_0(nats_url: str) -> None:
    proc = start("service", "--nats-url", nats_url, "--drain-s", "0.5")
    lines = wait_for_line(proc, "demo serving")
    handled = next(x for x in lines if x["message"] == "handling a request")
    assert handled["request_id"] == "req-42" and handled["service"] == "demo"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 0
    assert time.monotonic() - sent < 10
    messages = [json.loads(line)["message"] for line in err.splitlines()]
    assert messages.index("drained") < messages.index("demo stopped"), messages


def test_a_drain_past_its_deadline_exits_1(nats_url: str) -> None:
    proc = start("service", "--nats-url", nats_url, "--drain-s", "30", "--deadline-s", "1")
    wait_for_line(proc, "demo serving")
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 1
    assert "did not stop within 1 s" in err


def test_a_signal_while_starting_exits_0(nats_url: str) -> None:
    proc = start("service", "--nats-url", nats_url, "--wait", "30")
    wait_for_line(proc, "starting")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 0, err
    assert "demo stopped while starting" in err


@pytest.mark.parametrize("kind", ["service", "executor"])
def test_start_up_failures_exit_1(nats_url: str, kind: str) -> None:
    code, err = finish(start(kind, "--nats-url", nats_url, "--fail", "expected"))
    assert code == 1
    assert "demo failed to start: DemoStartupError: configured to fail" in err
    assert "Traceback" not in err
    code, err = finish(start(kind, "--nats-url", nats_url, "--fail", "bug"))
    assert code == 1
    assert "demo failed to start: KeyError" in err and "Traceback" in err


def test_unreachable_nats_is_a_start_up_failure() -> None:
    proc = start("service", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    code, err = finish(proc, timeout=30)
    assert code == 1
    assert "NatsConnectTimeout" in err and "Traceback" not in err


def test_executor_opens_its_port_before_initialising_and_stops_on_sigterm() -> None:
    proc = start("executor", "--wait", "0.2")
    lines = wait_for_line(proc, "demo ready")
    assert [x["message"] for x in lines].index("port open") < len(lines) - 1
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 0 and "executor stopped" in err


def test_a_service_can_stop_itself_as_a_signal_would(nats_url: str) -> None:
    code, err = finish(start("service", "--nats-url", nats_url, "--stop-after-s", "0.5"))
    assert code == 0, err
    assert "drained" in err


def test_a_service_that_stops_itself_with_a_code_drains_then_exits_with_it(nats_url: str) -> None:
    """What the vLLM proxy does when vLLM dies: stop as a signal would, but end with exit code 1 (here 3)."""
    code, err = finish(start("service", "--nats-url", nats_url, "--stop-after-s", "0.5", "--stop-code", "3"))
    assert code == 3, err
    assert "drained" in err


@pytest.mark.parametrize(("choice", "loop"), [(None, "uvloop"), ("auto", "uvloop"), ("asyncio", "asyncio")])
def test_services_run_on_uvloop_unless_told_otherwise(nats_url: str, choice: str | None, loop: str) -> None:
    env = {} if choice is None else {"CORNSERVE_EVENT_LOOP": choice}
    proc = start("service", "--nats-url", nats_url, env=env)
    lines = wait_for_line(proc, "demo serving")
    said = [x["message"] for x in lines if "event loop" in str(x["message"])]
    assert said == [f"running on the {loop} event loop"], said
    assert any(x["message"] == f"loop module {loop}" for x in lines), lines
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 0


@pytest.mark.parametrize(("choice", "loop"), [(None, "asyncio"), ("uvloop", "uvloop")])
def test_executors_keep_the_standard_loop_unless_told_otherwise(choice: str | None, loop: str) -> None:
    env = {} if choice is None else {"CORNSERVE_EVENT_LOOP": choice}
    proc = start("executor", env=env)
    lines = wait_for_line(proc, "port open")
    said = [x["message"] for x in lines if "event loop" in str(x["message"])]
    assert said == [f"running on the {loop} event loop"], said
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 0


def test_an_unknown_event_loop_is_a_bad_setting() -> None:
    proc = start("service", env={"CORNSERVE_EVENT_LOOP": "tokio"})
    code, err = finish(proc)
    assert code == 2
    assert "event_loop" in err or "EVENT_LOOP" in err, err
