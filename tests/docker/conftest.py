"""The container images and a compose deployment of them, shared by the module's tests.

The images come from deploy/docker/build.sh, which skips an image already built from the same
sources and lock, so a second run builds nothing. The deployment is deploy/compose.yaml under a
project name of its own, with its own free loopback ports and its own state dir: it cannot meet a
deployment a person runs on the same machine. Everything talks over loopback only (the containers
use the host's network and bind 127.0.0.1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import docker
import pytest
from tests.support.compose import BUILD_DEADLINE_S, ROOT, UP_DEADLINE_S, Deployment, logs

from cornserve.runtime.process import free_port


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The local Docker engine (from DOCKER_HOST or the default socket); the tests fail without one."""
    client = docker.from_env(timeout=600)
    client.ping()
    yield client
    client.close()


@pytest.fixture(scope="session")
def images(docker_client: docker.DockerClient) -> dict[str, str]:
    """Build (or find up to date) the control, sidecar and node images; their tags by target."""
    done = subprocess.run(
        [str(ROOT / "deploy" / "docker" / "build.sh")],
        capture_output=True, text=True, timeout=BUILD_DEADLINE_S, check=False,
    )  # fmt: skip
    sys.stderr.write(done.stderr)
    assert done.returncode == 0, f"deploy/docker/build.sh failed:\n{done.stdout}\n{done.stderr}"
    return {target: f"cornserve-{target}:latest" for target in ("control", "sidecar", "node")}


@pytest.fixture(scope="module")
def deployment(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """deploy/compose.yaml brought up (`up -d` returns once the demo app answers); down at the end."""
    project = f"cornserve-test-{uuid.uuid4().hex[:8]}"
    state_dir = tmp_path_factory.mktemp("compose-state")
    gateway_port = free_port()
    env = {
        **os.environ,
        "CORNSERVE_DEPLOY_STATE": str(state_dir),
        "CORNSERVE_GATEWAY_PORT": str(gateway_port),
        "CORNSERVE_NATS_PORT": str(free_port()),
        "CORNSERVE_NATS_MONITOR_PORT": str(free_port()),
        "CORNSERVE_NODE_NAME": project,  # its sidecars' shared memory is named after it
    }
    found = Deployment(project, state_dir, f"http://127.0.0.1:{gateway_port}", env)
    try:
        up = found.compose("up", "-d", timeout=UP_DEADLINE_S)
        assert up.returncode == 0, f"docker-compose up failed:\n{up.stdout}\n{up.stderr}\n{logs(found)}"
        yield found
    finally:
        found.compose("down", "--volumes", "--timeout", "60")
