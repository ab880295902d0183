"""Helpers for Eric's tests: processes, ports, HTTP, the cluster handle."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ranks = itertools.count(500)  # away from the ranks other test packages use in the same session


def next_rank() -> int:
    return next(_ranks)


STARTUP_DEADLINE_S = 180.0


def http_json(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.log()}") from None
        return int(self.proc.returncode)


def spawn(name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env)
    log.close()
    return Proc(name, proc, log_path)


@dataclass
class Eric:
    proc: Proc
    url: str
    model_dir: Path
    src_rank: int


@dataclass
class Cluster:
    nats_url: str
    dst_rank: int
    erics: dict[str, Eric]
    failed: Proc
    log_dir: Path


def wait_sidecar(p: Proc, nats_url: str, rank: int) -> None:
    """Poll the sidecar's INFO subject until it answers (with a deadline)."""
    import asyncio

    import nats

    from cornserve.bus.micro import NoResponders, RequestTimeout, request
    from cornserve.bus.sidecar import InfoReply, InfoRequest
    from cornserve.bus.subjects import SidecarVerb, sidecar_subject

    async def poll() -> None:
        nc = await nats.connect(nats_url)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited:\n{p.log()}")
                try:
                    await request(nc, sidecar_subject(rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 1.0)
                    return
                except (NoResponders, RequestTimeout):
                    await asyncio.sleep(0.05)
            raise TimeoutError(f"{p.name} not ready:\n{p.log()}")
        finally:
            await nc.close()

    asyncio.run(poll())


def wait_healthy(erics: list[Eric]) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    pending = list(erics)
    while pending:
        for e in list(pending):
            if e.proc.proc.poll() is not None:
                raise RuntimeError(f"{e.proc.name} exited with {e.proc.proc.returncode}:\n{e.proc.log()}")
            try:
                status, _ = http_json("GET", f"{e.url}/health", timeout=5)
            except (urllib.error.URLError, OSError):
                status = 0
            if status == 200:
                pending.remove(e)
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"Eric not healthy in {STARTUP_DEADLINE_S}s:\n{pending[0].proc.log()}")
        if pending:
            time.sleep(0.2)
