"""A compose deployment of deploy/compose.yaml seen from the tests: its project, state and URL."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from cornserve.runtime.secrets import read_secret_file

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
BUILD_DEADLINE_S = 3600.0
"""A cold build downloads PyTorch and its CUDA libraries into the node image."""
UP_DEADLINE_S = 900.0
"""`up -d` returns when the demo app is registered: checkpoint built, executors loaded."""
DOWN_DEADLINE_S = 300.0


@dataclass(frozen=True)
class Deployment:
    """One running compose project."""

    project: str
    state_dir: Path
    url: str
    env: dict[str, str]

    @property
    def admin_token(self) -> str:
        return read_secret_file(self.state_dir / "admin-token")

    def compose(self, *args: str, timeout: float = DOWN_DEADLINE_S) -> subprocess.CompletedProcess[str]:
        """Run docker-compose on this project (there is no Python API for compose files)."""
        return subprocess.run(
            ["docker-compose", "--project-name", self.project, "--file", str(COMPOSE_FILE), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip


def logs(deployment: Deployment) -> str:
    """The deployment's container logs (the tail of each), for failure messages."""
    return deployment.compose("logs", "--no-color", "--tail", "60", timeout=60).stdout
