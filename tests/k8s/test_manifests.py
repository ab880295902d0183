"""deploy/k8s: the rendered kustomization validates against the Kubernetes API schemas (offline),
and its parts agree with each other and with the code (flags, Secrets, RBAC, the spawner's settings)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.support.waiting import wait_for, wait_gone

from cornserve.dispatcher.main import DispatcherSettings
from cornserve.gateway.main import GatewaySettings
from cornserve.resource_manager.k8s_pods import KubernetesSettings
from cornserve.resource_manager.main import ResourceManagerSettings
from cornserve.runtime.settings import ServiceSettings, build_parser
from cornserve.sidecar.server import SidecarSettings

from .support import (
    CLUSTER_SCOPED,
    K8S_DIR,
    check_names,
    pod_containers,
    pod_spec,
    render_kustomization,
    validate,
)

DOCS = render_kustomization(K8S_DIR)


def _id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def test_the_kustomization_has_every_part() -> None:
    kinds = {_id(d) for d in DOCS}
    for expected in (
        "StatefulSet/nats",
        "Service/nats",
        "Job/cornserve-kv-buckets",
        "Deployment/cornserve-gateway",
        "Service/cornserve-gateway",
        "Deployment/cornserve-resource-manager",
        "ServiceAccount/cornserve-resource-manager",
        "Role/cornserve-resource-manager",
        "RoleBinding/cornserve-resource-manager",
        "ClusterRole/cornserve-resource-manager-nodes",
        "ClusterRoleBinding/cornserve-resource-manager-nodes",
        "Deployment/cornserve-dispatcher",
        "DaemonSet/cornserve-sidecar",
    ):
        assert expected in kinds
    assert len(kinds) == len(DOCS), "two objects share a kind and name"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_object_validates_against_the_api_schema(doc: dict[str, Any]) -> None:
    validate(doc)
    check_names(doc)
    if doc["kind"] not in CLUSTER_SCOPED:
        assert doc["metadata"]["namespace"] == "cornserve"


def test_the_validator_refuses_what_the_api_refuses() -> None:
    """The check can fail: a misspelt field and a wrong type are errors."""
    deployment = json.loads(json.dumps(_find("Deployment", "cornserve-gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolicie"):
        validate(deployment)
    deployment = json.loads(json.dumps(_find("Deployment", "cornserve-gateway")))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        validate(deployment)


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")], ids=_id
)
def test_workload_selectors_match_their_templates(doc: dict[str, Any]) -> None:
    selector = doc["spec"]["selector"]["matchLabels"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_nats_is_a_routed_three_server_jetstream_cluster() -> None:
    nats = _find("StatefulSet", "nats")
    assert nats["spec"]["replicas"] == 3
    conf = _find("ConfigMap", "nats-config")["data"]["nats.conf"]
    routes = re.findall(r"nats://(nats-\d)\.nats:6222", conf)
    assert routes == ["nats-0", "nats-1", "nats-2"]
    assert "jetstream" in conf and 'include "auth/server.conf"' in conf
    # The buckets get 3 replicas; every service is given all three servers.
    kv = pod_containers(_find("Job", "cornserve-kv-buckets"))[-1]["command"]
    assert "--replicas=3" in kv
    urls = {
        e["value"]
        for d in DOCS
        for c in pod_containers(d)
        for e in c.get("env", [])
        if e["name"] == "CORNSERVE_NATS_URL"
    }
    assert urls == {"nats://nats-0.nats:4222,nats://nats-1.nats:4222,nats://nats-2.nats:4222"}


def _secret_names(doc: dict[str, Any]) -> set[str]:
    spec = pod_spec(doc) or {}
    return {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}


def test_secrets_are_referenced_and_documented_never_embedded() -> None:
    assert not [d for d in DOCS if d["kind"] == "Secret"], "a Secret's data would sit in the repository"
    referenced = set().union(*(_secret_names(d) for d in DOCS))
    settings = KubernetesSettings.model_validate_json(
        _find("ConfigMap", "cornserve-spawner")["data"]["settings.json"]
    )
    referenced |= {s for s in (settings.nats_creds_secret, settings.executor_nats_creds_secret) if s}
    documented = set(re.findall(r"^\| (cornserve-[a-z-]+) \|", (K8S_DIR / "secrets.md").read_text(), re.M))
    assert referenced == documented


def test_the_resource_manager_may_do_what_its_spawner_does_and_no_more() -> None:
    rm = _find("Deployment", "cornserve-resource-manager")
    assert rm["spec"]["replicas"] == 1 and rm["spec"]["strategy"]["type"] == "Recreate"
    assert rm["spec"]["template"]["spec"]["serviceAccountName"] == "cornserve-resource-manager"
    role = _find("Role", "cornserve-resource-manager")
    grants = {
        (r, v, tuple(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    # The calls of cornserve.resource_manager.k8s_spawner: create/list/get/delete pods, read logs,
    # read the sidecar ranks ConfigMap (that one only).
    settings = KubernetesSettings.model_validate_json(
        _find("ConfigMap", "cornserve-spawner")["data"]["settings.json"]
    )
    needed = {(r, v, ()) for r, v in (("pods", "create"), ("pods", "list"), ("pods", "get"), ("pods", "delete"), ("pods/log", "get"))}  # fmt: skip
    needed.add(("configmaps", "get", (settings.sidecar_ranks_configmap,)))
    assert grants == needed, "the Role grants more (or less) than the spawner uses"
    # Nodes are cluster-scoped: listing them, and nothing more, is a ClusterRole's.
    nodes = _find("ClusterRole", "cornserve-resource-manager-nodes")
    assert nodes["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]
    for kind, name in (("RoleBinding", "cornserve-resource-manager"), ("ClusterRoleBinding", "cornserve-resource-manager-nodes")):  # fmt: skip
        binding = _find(kind, name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "cornserve-resource-manager", "namespace": "cornserve"}
        ]
    # No other workload gets an API token.
    for doc in DOCS:
        spec = pod_spec(doc)
        if spec is not None and doc is not rm:
            assert spec.get("automountServiceAccountToken") is False, _id(doc)


def test_the_spawner_settings_in_the_configmap_are_valid() -> None:
    settings = KubernetesSettings.model_validate_json(
        _find("ConfigMap", "cornserve-spawner")["data"]["settings.json"]
    )
    assert settings.namespace == "cornserve"
    sidecar_shm = {v["name"]: v for v in pod_spec(_find("DaemonSet", "cornserve-sidecar"))["volumes"]}["shm"]
    assert sidecar_shm["hostPath"]["path"] == settings.shm_host_path, (
        "sidecars and executors must share /dev/shm"
    )


def _service_command(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


SERVICES: dict[str, tuple[type[ServiceSettings], str]] = {
    "cornserve-gateway": (GatewaySettings, "cornserve-gateway"),
    "cornserve-resource-manager": (ResourceManagerSettings, "cornserve-resource-manager"),
    "cornserve-dispatcher": (DispatcherSettings, "cornserve-dispatcher"),
}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_commands_use_real_flags_and_settings(name: str) -> None:
    settings_type, program = SERVICES[name]
    container = pod_spec(_find("Deployment", name))["containers"][0]
    command = _service_command(container)
    assert command[0] == program
    parsed = vars(build_parser(settings_type).parse_args(command[1:]))  # an unknown flag exits
    fields = set(settings_type.model_fields)
    for env in container.get("env", []):
        assert env["name"].startswith("CORNSERVE_") and env["name"][10:].lower() in fields, env["name"]
    values = {k: v for k, v in parsed.items() if v is not None}
    values |= {e["name"][10:].lower(): e["value"] for e in container.get("env", []) if "value" in e}
    settings_type.model_validate(values)


def test_the_sidecar_command_uses_real_flags() -> None:
    container = pod_spec(_find("DaemonSet", "cornserve-sidecar"))["containers"][0]
    script = container["command"][-1].replace("\\\n", " ")
    line = next(ln for ln in script.splitlines() if "cornserve-sidecar " in ln)
    words = shlex.split(line.strip().removesuffix("&"))
    args = words[words.index("cornserve-sidecar") + 1 :]
    parsed = vars(build_parser(SidecarSettings).parse_args(args))
    assert {"rank", "node", "tcp_host", "sidecar_peer_secret_file"} <= {
        k for k, v in parsed.items() if v is not None
    }
    names = {e["name"][10:].lower() for e in container["env"] if e["name"].startswith("CORNSERVE_")}
    assert names - {"sidecars_per_node"} <= set(SidecarSettings.model_fields)


SHELL_SCRIPTS = [
    (f"{_id(d)}:{c['name']}", c["command"])
    for d in DOCS
    for c in pod_containers(d)
    if c.get("command", [""])[0] in ("sh", "bash")
]


@pytest.mark.parametrize(("where", "command"), SHELL_SCRIPTS, ids=[w for w, _ in SHELL_SCRIPTS])
def test_shell_scripts_parse(where: str, command: list[str]) -> None:
    shell, flag, script = command
    assert flag == "-c"
    result = subprocess.run(
        [shell, "-n", "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"{where}: {result.stderr}"


def test_the_sidecar_script_starts_one_sidecar_per_device_with_ranks_from_the_configmap(
    tmp_path: Path,
) -> None:
    """Run the DaemonSet's script with `cornserve-sidecar` replaced by a recorder: the ranks it starts."""
    container = pod_spec(_find("DaemonSet", "cornserve-sidecar"))["containers"][0]
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    (ranks / "worker-1").write_text("4")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "cornserve-sidecar"
    # Records its arguments, then exits 3 once both have started (or after 10 s).
    fake.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/started\n'
        f'for i in $(seq 200); do [ "$(wc -l < {tmp_path}/started)" -ge 2 ] && break; sleep 0.05; done\nexit 3\n'
    )
    fake.chmod(0o755)
    script = container["command"][-1].replace("/etc/cornserve/ranks", str(ranks))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "NODE_NAME": "worker-1",
        "HOST_IP": "10.0.0.7",
        "CORNSERVE_SIDECARS_PER_NODE": "2",
    }
    result = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1 and "a sidecar exited" in result.stderr  # one exited: the pod restarts
    started = sorted((tmp_path / "started").read_text().splitlines())
    assert [line.split()[:4] for line in started] == [
        ["--rank", "4", "--node", "worker-1"],
        ["--rank", "5", "--node", "worker-1"],
    ]
    assert all("--tcp-host 10.0.0.7" in line for line in started)
    env["NODE_NAME"] = "unknown-node"
    result = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1 and "no first sidecar rank for node unknown-node" in result.stderr


async def test_the_sidecar_script_stops_its_sidecars_on_sigterm(tmp_path: Path) -> None:
    container = pod_spec(_find("DaemonSet", "cornserve-sidecar"))["containers"][0]
    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "worker-0").write_text("0")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "cornserve-sidecar"
    fake.write_text(
        f'#!/bin/sh\necho $$ >> {tmp_path}/pids\necho "$@" >> {tmp_path}/started\nexec sleep 60\n'
    )
    fake.chmod(0o755)
    script = container["command"][-1].replace("/etc/cornserve/ranks", str(tmp_path / "ranks"))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "NODE_NAME": "worker-0",
        "HOST_IP": "10.0.0.7",
        "CORNSERVE_SIDECARS_PER_NODE": "3",
    }
    proc = subprocess.Popen(["bash", "-c", script], env=env, stderr=subprocess.DEVNULL)
    try:
        started = tmp_path / "started"
        await wait_for(
            lambda: started.exists() and len(started.read_text().splitlines()) == 3, 20, "3 sidecars"
        )
        sleepers = [int(p) for p in (tmp_path / "pids").read_text().split()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # a stop, not a failure
        await wait_gone(sleepers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_resource_managers_inventory_matches_the_sidecars() -> None:
    """Devices are served by sidecars of the same rank: the spawner's nodes, ranks and slots are the DaemonSet's."""
    rm = pod_spec(_find("Deployment", "cornserve-resource-manager"))["containers"][0]
    flags = dict(a.removeprefix("--").split("=", 1) for a in rm["command"][1:] if "=" in a)
    daemonset = pod_spec(_find("DaemonSet", "cornserve-sidecar"))
    sidecars = daemonset["containers"][0]
    per_node = next(e["value"] for e in sidecars["env"] if e["name"] == "CORNSERVE_SIDECARS_PER_NODE")
    assert flags["cpu-slots"] == per_node
    settings = KubernetesSettings.model_validate_json(
        _find("ConfigMap", "cornserve-spawner")["data"]["settings.json"]
    )
    # The inventory lists the nodes the DaemonSet runs on, and reads the ranks from its ConfigMap.
    assert settings.node_selector == daemonset["nodeSelector"]
    ranks = {v["configMap"]["name"] for v in daemonset["volumes"] if "configMap" in v}
    assert settings.sidecar_ranks_configmap in ranks
