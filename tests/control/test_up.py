"""`cornserve up` as a user runs it: a subprocess that prints the URL, serves, and stops cleanly.

A child service that dies is restarted by `up`. Both stop paths are covered — Ctrl-C (SIGINT) on `cornserve up` after an app was deployed (so task
managers and executors exist), and `cornserve down --state-dir` from another process — and after
each, no process of that cluster may be left (found by scanning /proc for the cluster's node id in
environments and its state dir in command lines) and no shared-memory file of its sidecars.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.control.apps import SUM_APP
from tests.control.support import TASKLIB, make_matrix_tensor

from cornserve.runtime.process import free_port

DEADLINE = 180.0
URL_LINE = re.compile(r"Cornserve is up in [\d.]+s: (http://\S+)")


def port_outside_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range, for `up --port`.

    `free_port` returns an ephemeral port that is free only until something else binds port 0, and
    `up` starts many children that do (nats-servers, sidecars' TCP listeners) before its gateway
    binds `--port`: once, one of them had taken the gateway's port first ("address already in use").
    A port the kernel never hands out for port 0 cannot be taken that way.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 8192), low))
    for port in random.sample(candidates, min(64, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class UpProcess:
    """`cornserve up` in its own process group, its output read line by line by a thread."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.state_dir = state_dir
        self.port = port_outside_ephemeral_range()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cornserve.cli.main",
                "up",
                "--state-dir",
                str(state_dir),
                "--port",
                str(self.port),
                "--cpu-slots",
                "2",
                "--dispatchers",
                "2",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_url(self) -> str:
        """The gateway URL from the line `up` prints once everything is healthy."""
        match = URL_LINE.search(self.wait_line("Cornserve is up in"))
        assert match, "".join(self.output)
        return match.group(1)

    def wait_line(self, text: str) -> str:
        """The first output line containing `text` (within the deadline)."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if text in line:
                return line
        raise AssertionError(f"`cornserve up` never printed {text!r}; its output:\n{''.join(self.output)}")

    def wait_exit(self) -> int:
        """Its exit code (killing its group if it hangs, so the test never leaks it)."""
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("`cornserve up` did not exit") from None
        finally:
            self.close()

    def kill(self) -> None:
        """SIGKILL its process group (cleanup after a failed assertion)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.close()

    def close(self) -> None:
        """Collect the rest of its output and close the pipe."""
        if self.proc.poll() is not None:
            self._reader.join(timeout=10)
            while True:
                try:
                    line = self.lines.get_nowait()
                except queue.Empty:
                    break
                if line is not None:
                    self.output.append(line)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def node(self) -> str:
        """The cluster's node id, from the state file it recorded."""
        state = json.loads((self.state_dir / "cluster.json").read_text())
        assert state["pid"] == self.proc.pid
        return str(state["node"])


def _child_pid(state_dir: Path, name: str) -> int:
    state = json.loads((state_dir / "cluster.json").read_text())
    return int(next(c["pid"] for c in state["children"] if c["name"] == name))


def cli(url: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it after `up`: the URL and the state dir (for the admin token) from the environment."""
    return subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", *args],
        env={**os.environ, "CORNSERVE_URL": url, "CORNSERVE_STATE_DIR": str(state_dir)},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


def cluster_processes(node: str, state_dir: Path) -> list[str]:
    """Live processes of the cluster: its node id in their environment or its state dir in argv."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue  # a zombie is dead; its parent reaps it
        if f"CORNSERVE_NODE={node}".encode() in environ.split(b"\0") or str(state_dir) in cmdline:
            found.append(f"{entry.name}: {cmdline[:160]}")
    return found


def assert_nothing_left(node: str, state_dir: Path) -> None:
    deadline = time.monotonic() + 30
    while (left := cluster_processes(node, state_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)  # grandchildren may still be finishing their own shutdown
    assert left == [], left
    assert not list(Path("/dev/shm").glob(f"cornserve-sidecar-{node}-*"))
    assert not (state_dir / "cluster.json").exists()


def serve_the_sums_app(url: str, state_dir: Path, tmp_path: Path) -> None:
    """Through the CLI: add the task library, register the sums app, invoke it and check its answer."""
    out = cli(url, state_dir, "tasklib", "add", str(TASKLIB), "--name", "tensor-math")
    assert out.returncode == 0, out.stderr
    app_file = tmp_path / "sums.py"
    app_file.write_text(SUM_APP)
    out = cli(url, state_dir, "register", str(app_file), "--name", "sums")
    assert out.returncode == 0 and "ready" in out.stdout, out.stdout + out.stderr
    out = cli(url, state_dir, "invoke", "sums", '{"seed": 4}')
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["sum"] == pytest.approx(float(make_matrix_tensor(4, 3, 3).sum()), abs=1e-3)


def cornserve_down(state_dir: Path) -> None:
    """`cornserve down --state-dir` succeeds."""
    down = subprocess.run(
        [sys.executable, "-m", "cornserve.cli.main", "down", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert down.returncode == 0, down.stdout + down.stderr


@pytest.mark.slow
def test_up_serves_then_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    up = UpProcess(state_dir)
    try:
        url = up.wait_url()
        node = up.node()
        token_file = state_dir / "admin-token"
        assert f"admin token: {token_file} (new)" in "".join(up.output)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        serve_the_sums_app(url, state_dir, tmp_path)
        running = cluster_processes(node, state_dir)  # the scan sees the whole tree, grandchildren too
        assert any("task_manager" in p for p in running) and any("nats-server" in p for p in running), running
        up.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert up.wait_exit() == 0, "".join(up.output)
    finally:
        up.kill()
    assert_nothing_left(node, state_dir)


@pytest.mark.slow
def test_up_then_cornserve_down_leaves_nothing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    up = UpProcess(state_dir)
    try:
        url = up.wait_url()
        node = up.node()
        out = cli(url, state_dir, "status")
        assert out.returncode == 0 and ": ok" in out.stdout, out.stdout + out.stderr
        # A service that dies is restarted by `up` instead of taking the cluster down.
        children = {
            c["name"]: c["pid"] for c in json.loads((state_dir / "cluster.json").read_text())["children"]
        }
        os.kill(children["dispatcher-0"], signal.SIGKILL)
        up.wait_line("restarting dispatcher-0")
        deadline = time.monotonic() + 60
        while (pid := _child_pid(state_dir, "dispatcher-0")) == children["dispatcher-0"]:
            assert time.monotonic() < deadline, "the state file never showed the restarted dispatcher"
            time.sleep(0.2)
        while (
            "dispatcher x2" not in (out := cli(url, state_dir, "status")).stdout
        ):  # the new one registers with NATS
            assert time.monotonic() < deadline, out.stdout + out.stderr
            time.sleep(0.5)
        assert pid != children["dispatcher-0"] and up.proc.poll() is None
        cornserve_down(state_dir)
        assert up.wait_exit() == 0, "".join(up.output)
    finally:
        up.kill()
    assert_nothing_left(node, state_dir)


@pytest.mark.slow
def test_up_with_a_nats_cluster_then_down_leaves_nothing(tmp_path: Path) -> None:
    """`up --nats-cluster 3`: three nats-servers serve the cluster; `down` stops every one of them."""
    state_dir = tmp_path / "state"
    up = UpProcess(state_dir, "--nats-cluster", "3")
    try:
        url = up.wait_url()
        node = up.node()
        state = json.loads((state_dir / "cluster.json").read_text())
        assert len(state["nats_urls"]) == 3 and state["nats_url"] == state["nats_urls"][0], state
        serve_the_sums_app(url, state_dir, tmp_path)
        servers = [p for p in cluster_processes(node, state_dir) if "nats-server" in p]
        assert len(servers) == 3, servers
        cornserve_down(state_dir)
        assert up.wait_exit() == 0, "".join(up.output)
    finally:
        up.kill()
    assert_nothing_left(node, state_dir)  # nats-servers too: their store dirs are under the state dir


def test_up_refuses_an_even_nats_cluster(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cornserve.cli.main",
            "up",
            "--state-dir",
            str(tmp_path),
            "--nats-cluster",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = " ".join(out.stderr.replace("│", " ").split())  # the usage error may be boxed and wrapped
    assert out.returncode == 2 and "--nats-cluster must be 1 or an odd number" in said, out.stderr
