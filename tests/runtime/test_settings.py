"""Settings: flag beats environment beats default; bad values exit 2 with one line, like argparse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.runtime.demo_service import DemoSettings

from cornserve.runtime.settings import DEFAULT_NATS_URL, RequiredSidecarRanks, ServiceSettings, parse_settings

DEMO = Path(__file__).with_name("demo_service.py")


def test_defaults_then_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORNSERVE_NATS_URL", raising=False)
    s = parse_settings(DemoSettings, [])
    assert (s.nats_url, s.port, s.greeting, s.log_level, s.log_format) == (
        DEFAULT_NATS_URL,
        1,
        "hello",
        "INFO",
        "text",
    )
    monkeypatch.setenv("CORNSERVE_NATS_URL", "nats://env:1")
    monkeypatch.setenv("CORNSERVE_PORT", "7")
    monkeypatch.setenv("CORNSERVE_GREETING", "from-env")
    s = parse_settings(DemoSettings, ["--port", "9"])
    assert (s.nats_url, s.port, s.greeting) == ("nats://env:1", 9, "from-env")
    s = parse_settings(DemoSettings, ["--nats-url", "nats://flag:2", "--greeting", "from-flag"])
    assert (s.nats_url, s.port, s.greeting) == ("nats://flag:2", 7, "from-flag")


def test_flag_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_settings(
        DemoSettings,
        [
            "--wait",
            "0.5",
            "--switch",
            "--batching",
            "off",
            "--sidecar-ranks",
            " 3, 4,",
            "--log-level",
            "debug",
        ],
    )
    assert (s.wait_s, s.switch, s.batching, s.sidecar_ranks, s.log_level) == (
        0.5,
        True,
        False,
        [3, 4],
        "DEBUG",
    )
    monkeypatch.setenv("CORNSERVE_SIDECAR_RANKS", "5,6")
    monkeypatch.setenv("CORNSERVE_SWITCH", "true")
    monkeypatch.setenv("CORNSERVE_SECRET", "s3")
    s = parse_settings(DemoSettings, [])
    assert (s.sidecar_ranks, s.switch, s.secret) == ([5, 6], True, "s3")


def test_env_only_fields_have_no_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(DemoSettings, ["--secret", "x"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --secret" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "0"], "--port: Input should be greater than 0"),
        (["--port", "x"], "--port: Input should be a valid integer"),
        (["--sidecar-ranks", "0,x"], "comma-separated integers"),
        (["--sidecar-ranks", "1,-2"], "must be >= 0"),
        (["--batching", "maybe"], "invalid choice"),
        (["--log-format", "xml"], "--log-format"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_values_are_one_line_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_settings(DemoSettings, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: demo-service")
    assert err[-1].startswith("demo-service: error: ") and message in err[-1], err
    assert sum("error:" in line for line in err) == 1, err


def test_a_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORNSERVE_PORT", "-1")
    with pytest.raises(SystemExit) as exit_:
        parse_settings(DemoSettings, [])
    assert exit_.value.code == 2
    assert "--port: Input should be greater than 0" in capsys.readouterr().err


class NeedsRanks(ServiceSettings):
    sidecar_ranks: RequiredSidecarRanks


def test_required_fields_and_required_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(NeedsRanks, [])
    assert "--sidecar-ranks is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(NeedsRanks, ["--sidecar-ranks", ""])
    assert "at least one sidecar rank" in capsys.readouterr().err
    assert parse_settings(NeedsRanks, ["--sidecar-ranks", "2"]).sidecar_ranks == [2]


def test_a_process_with_a_bad_flag_exits_2_before_connecting_anywhere() -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMO), "service", "--port", "70000", "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("demo-service: error: --port: Input should be less than 65536"), proc.stderr
