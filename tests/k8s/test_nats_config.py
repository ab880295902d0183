"""The NATS config of deploy/k8s is one the real nats-server accepts (`nats-server -t`), with the
authorization block `cornserve deploy init` generates included as the Secret mounts it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cornserve.cli.natsauth import NatsAuth
from cornserve.cli.natsserver import find_nats_server_binary

from .support import K8S_DIR, render_kustomization


def _check(conf: str, directory: Path) -> subprocess.CompletedProcess[str]:
    (directory / "nats.conf").write_text(conf)
    NatsAuth.generate(directory / "auth")  # where the StatefulSet mounts Secret cornserve-nats-server
    return subprocess.run(
        [find_nats_server_binary(), "-t", "-c", str(directory / "nats.conf")],
        env={**os.environ, "POD_NAME": "nats-1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _conf() -> str:
    [config] = [
        d
        for d in render_kustomization(K8S_DIR)
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-config"
    ]
    conf: str = config["data"]["nats.conf"]
    return conf


def test_nats_server_accepts_the_config(tmp_path: Path) -> None:
    result = _check(_conf(), tmp_path)
    assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )


def test_the_check_refuses_a_broken_config(tmp_path: Path) -> None:
    result = _check(_conf().replace("lame_duck_duration: 30s", "lame_duck_duration: 5s"), tmp_path)
    assert result.returncode != 0 and "lame_duck_duration" in result.stdout + result.stderr
