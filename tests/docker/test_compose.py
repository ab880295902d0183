"""deploy/: the images and the compose deployment, end to end on a real Docker engine (marker `docker`).

In file order: the images' properties; the deployment answers the example app exactly as a
`cornserve up` cluster does on the same tiny checkpoint; a killed executor comes back; `down`
leaves no container, volume or shared memory behind.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.models.containers import Container
from tests.support.cluster import running_local_cluster
from tests.support.compose import ROOT, Deployment, logs
from tests.support.plugin import TinyCheckpoint

from cornserve.cli.bundled import DEMO_APP_FILE, example_text
from cornserve.client import CornserveClient

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

REQUEST: dict[str, Any] = json.loads((ROOT / "examples" / "mllm_request.json").read_text())
RESTART_DEADLINE_S = 120.0
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "make", "ld")


def text_of(item: dict[str, Any]) -> str:
    """The text in one item the demo app yields: `{"text": ...}`, or an OpenAI chat completion chunk."""
    if "text" in item:
        return str(item["text"])
    parts = [c.get("delta", c.get("message", {})).get("content") or "" for c in item.get("choices", [])]
    return "".join(parts)


async def answer(url: str, token: str) -> str:
    """The demo app's streamed answer to the example request, joined."""
    async with CornserveClient(url, token=token, timeout_s=600) as client:
        return "".join([text_of(item) async for item in client.invoke_app("demo", REQUEST)])


async def executors(url: str, token: str) -> dict[str, dict[int, str]]:
    """Each deployed task's executors: PID (in the node container) to state."""
    async with CornserveClient(url, token=token, timeout_s=60) as client:
        tasks = (await client.list_tasks()).tasks
    return {t.key: {e.pid: e.state for e in t.executors if e.pid} for t in tasks}


def container_of(client: docker.DockerClient, deployment: Deployment, service: str) -> Container:
    found = client.containers.list(
        filters={
            "label": [
                f"com.docker.compose.project={deployment.project}",
                f"com.docker.compose.service={service}",
            ]
        }
    )
    assert len(found) == 1, f"expected one running {service} container, found {found}"
    return found[0]


@pytest.mark.parametrize("target", ["control", "sidecar", "node"])
def test_images_run_unprivileged_with_a_healthcheck_and_no_compiler_or_build_ca(
    docker_client: docker.DockerClient, images: dict[str, str], target: str
) -> None:
    image = docker_client.images.get(images[target])
    config = image.attrs["Config"]
    assert config["User"] == "cornserve"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Labels"]["org.cornserve.version"] == "0.1.0"
    probe = "; ".join(f"command -v {c} && echo found {c}" for c in COMPILERS)
    probe += "; test -e /tmp/build-ca.crt && echo found the build CA; id -u"
    out = docker_client.containers.run(image.id, ["sh", "-c", probe], remove=True, network_mode="none")
    lines = out.decode().split()
    assert "found" not in lines, f"{images[target]}: {out.decode()}"
    assert lines[-1] != "0", f"{images[target]} runs as root"
    # The machine's CA bundle went into the builder stage only: no layer of the image added it.
    history = " ".join(str(step.get("CreatedBy", "")) for step in image.history())
    assert "build-ca.crt" not in history


def test_compose_answers_like_a_local_cluster_on_the_same_checkpoint(
    deployment: Deployment, tiny_checkpoint: TinyCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_containers = asyncio.run(answer(deployment.url, deployment.admin_token))
    assert in_containers, f"the deployment streamed no text\n{logs(deployment)}"

    # The same app on `cornserve up` with the same tiny checkpoint (seed 0, as `deploy demo` builds it).
    monkeypatch.setenv("CORNSERVE_DEMO_MODEL", str(tiny_checkpoint("qwen2-vl", seed=0)))
    with running_local_cluster(tmp_path / "local", cpu_slots=4) as local:

        async def register_and_answer() -> str:
            async with CornserveClient(local.url, token=local.admin_token, timeout_s=600) as client:
                async for _ in client.register_app("demo", example_text(DEMO_APP_FILE)):
                    pass
            return await answer(local.url, local.admin_token)

        on_local = asyncio.run(register_and_answer())
    assert in_containers == on_local


def test_a_killed_executor_is_restarted_and_serves_again(
    docker_client: docker.DockerClient, deployment: Deployment
) -> None:
    token = deployment.admin_token
    first = asyncio.run(answer(deployment.url, token))
    before = asyncio.run(executors(deployment.url, token))
    assert len(before) == 2 and all(before.values()), before  # the encoder and the LLM
    key, pids = next(iter(sorted(before.items())))
    victim = min(pids)
    node = container_of(docker_client, deployment, "node")
    killed = node.exec_run(["sh", "-c", f"kill -9 {victim}"])
    assert killed.exit_code == 0, killed.output

    def replaced(now: dict[int, str]) -> bool:
        return bool(now) and victim not in now and all(state == "ready" for state in now.values())

    deadline = time.monotonic() + RESTART_DEADLINE_S
    now = before[key]
    while time.monotonic() < deadline and not replaced(now):
        time.sleep(1.0)
        now = asyncio.run(executors(deployment.url, token)).get(key, {})
    assert replaced(now), (
        f"executor {victim} of {key} was not replaced by a ready one: {now}\n{logs(deployment)}"
    )
    assert asyncio.run(answer(deployment.url, token)) == first, "another answer after the restart"
    node.reload()  # the listing has no restart count; the inspection has
    assert node.attrs["RestartCount"] == 0, (
        "the node container restarted: an executor's death is the node's business"
    )


def test_down_leaves_no_container_volume_or_shared_memory(
    docker_client: docker.DockerClient, deployment: Deployment
) -> None:
    label = f"com.docker.compose.project={deployment.project}"
    assert docker_client.containers.list(filters={"label": label}), "the deployment is not running"
    assert docker_client.volumes.list(filters={"label": label})
    # The sidecars' arenas are in the node container's own /dev/shm, which goes with the container.
    arenas = container_of(docker_client, deployment, "node").exec_run(["sh", "-c", "ls /dev/shm"])
    assert f"cornserve-sidecar-{deployment.project}-".encode() in arenas.output, arenas.output

    down = deployment.compose("down", "--volumes", "--timeout", "60")
    assert down.returncode == 0, down.stdout + down.stderr

    assert docker_client.containers.list(all=True, filters={"label": label}) == []
    assert docker_client.volumes.list(filters={"label": label}) == []
    assert docker_client.networks.list(filters={"label": label}) == []
    # Nothing of the node on the host either (other test runs on this machine have other node names).
    left = sorted(Path("/dev/shm").glob(f"cornserve-sidecar-{deployment.project}-*"))
    assert not left, f"shared memory left on the host: {left}"
