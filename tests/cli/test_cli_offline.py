"""The `cornserve` command without a cluster: help, shell completion, `graph`, and the log reader.

Each CLI call is a real subprocess (`python -m cornserve.cli.main`), as a script or a user runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.terminal import run_in_terminal

from cornserve.cli.answers import show_answer, text_of
from cornserve.cli.logs import LogFile, last_lines, resolve, task_patterns

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mllm_app.py"
REQUEST = Path(__file__).resolve().parents[2] / "examples" / "mllm_request.json"
TEXT_ONLY = '{"messages": [{"role": "user", "content": "hi"}]}'
DEADLINE_S = 120
ESC = "\x1b["


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        check=False,
        env=env if env is not None else dict(os.environ),
    )


def test_help_lists_every_command_grouped_and_plain_when_piped() -> None:
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    assert ESC not in out.stdout
    for command in ("up", "down", "status", "logs", "register", "apps", "invoke", "unregister", "graph",
                    "trace", "tasks", "scale", "tasklib", "demo", "models"):  # fmt: skip
        assert f" {command} " in out.stdout, command
    for panel in ("Local cluster", "Apps", "Tasks", "Tools"):
        assert panel in out.stdout
    assert "--install-completion" in out.stdout and "--show-completion" in out.stdout
    up = cli("up", "--help")
    assert up.returncode == 0 and all(f in up.stdout for f in ("--state-dir", "--port", "--cpu-slots")), (
        up.stdout
    )


@pytest.mark.slow  # ~12 s: a fresh CLI process per case
def test_usage_errors_exit_2() -> None:
    assert cli("nope").returncode == 2
    assert cli("invoke", "only-the-app").returncode == 2
    assert cli("scale", "key", "not-a-number").returncode == 2
    bad = cli("up", "--nats-sync-interval", "soon")
    assert bad.returncode == 2 and "--nats-sync-interval" in bad.stderr


def test_bash_completion_script_and_completions() -> None:
    # The shell is detected from the parent processes: a bash that waits for the command.
    script = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m cornserve.cli.main --show-completion; exit $?"],
        capture_output=True, text=True, timeout=DEADLINE_S, check=False,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert "_CORNSERVE_COMPLETE=complete_bash" in script.stdout and "complete " in script.stdout
    env = {
        **os.environ,
        "_CORNSERVE_COMPLETE": "complete_bash",
        "COMP_WORDS": "cornserve lo",
        "COMP_CWORD": "1",
    }
    completed = cli(env=env)
    assert completed.returncode == 0 and completed.stdout.split() == ["logs"], completed.stdout
    env.update(COMP_WORDS="cornserve tasklib ", COMP_CWORD="2")
    assert sorted(cli(env=env).stdout.split()) == ["add", "list"]


def test_graph_prints_mermaid_of_the_example_app() -> None:
    out = cli("graph", str(EXAMPLE), f"@{REQUEST}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "flowchart LR" and ESC not in out.stdout
    assert any("EncoderTask[image]" in line for line in lines)
    assert any(line.strip().startswith("t0 -->|Tensor") and line.strip().endswith("t1") for line in lines)
    assert "t1 -.->|stream| out" in out.stdout
    text_only = cli("graph", str(EXAMPLE), TEXT_ONLY)
    assert text_only.returncode == 0 and "EncoderTask" not in text_only.stdout, text_only.stderr


def test_graph_errors() -> None:
    missing = cli("graph", "/nonexistent/app.py", "{}")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    invalid = cli("graph", str(EXAMPLE), '{"messages": []}')
    assert invalid.returncode == 1 and "List should have at least 1 item" in invalid.stderr
    bad_json = cli("graph", str(EXAMPLE), "{nope")
    assert bad_json.returncode == 1 and "not valid JSON" in bad_json.stderr


def test_graph_svg_without_graphviz_says_what_to_install(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir)}  # no `dot` there; the interpreter is called by its path
    out = cli("graph", str(EXAMPLE), f"@{REQUEST}", "--svg", str(tmp_path / "g.svg"), env=env)
    assert out.returncode == 1 and "graphviz" in out.stderr.lower(), out.stderr
    assert out.stdout.startswith("flowchart LR")  # the Mermaid text still came out
    assert not (tmp_path / "g.svg").exists()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_graph_svg_with_graphviz(tmp_path: Path) -> None:
    target = tmp_path / "g.svg"
    out = cli("graph", str(EXAMPLE), f"@{REQUEST}", "--svg", str(target))
    assert out.returncode == 0, out.stderr
    svg = target.read_text()
    assert "<svg" in svg and "EncoderTask[image]" in svg


def test_graph_on_a_terminal_is_the_same_mermaid() -> None:
    code, text = run_in_terminal(
        [sys.executable, "-m", "cornserve.cli.main", "graph", str(EXAMPLE), TEXT_ONLY],
        dict(os.environ),
        DEADLINE_S,
    )
    assert code == 0 and "flowchart LR" in text and "LLMTask[embeddings]" in text, text


def test_log_reader_keeps_partial_lines_and_survives_truncation(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"one\ntwo\nthr")
    lines, offset = last_lines(path, 1)
    assert lines == ["two"] and offset == len(b"one\ntwo\n")
    log = LogFile(path, offset)
    assert log.read_new() == []  # "thr" has no newline yet
    with path.open("ab") as f:
        f.write(b"ee\nfour\n")
    assert log.read_new() == ["three", "four"]
    path.write_bytes(b"new\n")  # truncated and rewritten (a restarted process)
    assert log.read_new() == ["new"]
    assert last_lines(path, 0) == (["new"], 4)


def test_log_targets_resolve_to_services_tasks_and_apps(tmp_path: Path) -> None:
    (tmp_path / "gateway.log").write_text("g\n")
    (tmp_path / "tm-echo-1a2b.log").write_text("tm\n")
    (tmp_path / "echo-1a2b.exec-0.log").write_text("ex\n")
    asked: list[str] = []

    def app_keys(name: str) -> list[str]:
        asked.append(name)
        return ["echo-1a2b"]

    assert resolve(tmp_path, "gateway", app_keys) == [str(tmp_path / "gateway.log")]
    assert resolve(tmp_path, "echo-1a2b", app_keys) == task_patterns(tmp_path, "echo-1a2b")
    assert resolve(tmp_path, "echo-1a2b.exec-0", app_keys) == [str(tmp_path / "echo-1a2b.exec-0.log")]
    assert asked == []
    assert resolve(tmp_path, "my-app", app_keys) == task_patterns(tmp_path, "echo-1a2b") and asked == [
        "my-app"
    ]
    with pytest.raises(LookupError, match="not a task key"):
        resolve(tmp_path, "../etc", app_keys)
    with pytest.raises(LookupError, match="no log directory"):
        resolve(tmp_path / "absent", "gateway", app_keys)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Follower:
    """`cornserve logs TARGET -f` as a subprocess whose lines a thread collects."""

    def __init__(self, state_dir: Path, target: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cornserve.cli.main", "logs", target, "-f", "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A terminal's Ctrl-C reaches a command whose SIGINT is at its default; pytest run in the
            # background of a script (SIGINT ignored, inherited) must not make the test fail.
            preexec_fn=_default_sigint,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, expected: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while expected not in self.seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.proc.poll() is None, (self.seen, self.proc.poll())
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.lines.get(timeout=min(remaining, 1.0)))

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            assert self.proc.stderr is not None and self.proc.stdout is not None
            errors = self.proc.stderr.read()
            self.proc.stderr.close()
            self.proc.stdout.close()
            assert "Traceback" not in errors, errors


def test_logs_follow_prints_new_lines_and_new_executors_until_ctrl_c(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "gateway.log").write_text("started\n")
    service = Follower(tmp_path, "gateway")
    try:
        service.wait_line("started")
        with (logs / "gateway.log").open("a") as f:
            f.write("a request\n")
        service.wait_line("a request")  # unprefixed: one file
    finally:
        assert service.interrupt() == 0
    (logs / "tm-echo-1a2b.log").write_text("assigning\n")
    task = Follower(tmp_path, "echo-1a2b")
    try:
        task.wait_line("tm-echo-1a2b | assigning")
        (logs / "echo-1a2b.exec-9.log").write_text("model loaded\n")  # an executor started later
        task.wait_line("echo-1a2b.exec-9 | model loaded")
    finally:
        assert task.interrupt() == 0


def test_logs_of_nothing_known_exit_1(tmp_path: Path) -> None:
    out = cli("logs", "gateway", "--state-dir", str(tmp_path))
    assert out.returncode == 1 and "no log directory" in out.stderr, out.stderr


def test_text_chunks_are_recognised_in_both_answer_shapes() -> None:
    assert text_of({"text": "hi"}) == "hi"
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "yo"}}]}
    assert text_of(chunk) == "yo"
    role_only = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    assert text_of(role_only) == ""
    completion = {
        "object": "chat.completion",
        "choices": [{"message": {"role": "assistant", "content": "all"}}],
    }
    assert text_of(completion) == "all"
    usage_only = {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3}}
    assert text_of(usage_only) == ""
    assert text_of({"sum": 3.0}) is None and text_of([1, 2]) is None and text_of({"text": 5}) is None


def test_streamed_text_on_a_terminal_is_written_as_it_comes_without_control_codes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats standard output as a terminal
    monkeypatch.delenv("CORNSERVE_PLAIN", raising=False)
    monkeypatch.delenv("TERM", raising=False)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        for piece in ("hel", "lo\x1b[2J", " world"):
            yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}

    assert asyncio.run(show_answer(chunks())) == 3
    out = capsys.readouterr().out
    assert out.startswith("hello[2J world\n") and "\x1b[2J" not in out, repr(out)
    assert "3 chunks; first after" in out
    monkeypatch.setenv("CORNSERVE_PLAIN", "1")
    assert asyncio.run(show_answer(chunks())) == 3
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["choices"][0]["delta"]["content"] for line in lines] == [
        "hel",
        "lo\x1b[2J",
        " world",
    ]
