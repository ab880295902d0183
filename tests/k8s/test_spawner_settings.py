"""`--spawner kubernetes`: the resource manager's flags, the settings file, and a clear error without an API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cornserve.resource_manager.k8s_spawner import KubernetesConfigError, KubernetesSpawner
from cornserve.resource_manager.main import ResourceManagerSettings, load_k8s_settings, make_spawner
from cornserve.runtime.settings import parse_settings


def test_the_flags_select_the_kubernetes_spawner(tmp_path: Path) -> None:
    settings = parse_settings(
        ResourceManagerSettings,
        ["--spawner", "kubernetes", "--k8s-settings", str(tmp_path / "s.json"), "--k8s-kubeconfig", "/kc"],
    )
    assert settings.spawner == "kubernetes" and settings.k8s_kubeconfig == Path("/kc")


def test_the_settings_file_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps({"namespace": "ml", "image": "reg/cornserve-node:9", "node_selector": {"pool": "a"}})
    )
    settings = load_k8s_settings(good)
    assert (settings.namespace, settings.image, settings.node_selector) == (
        "ml",
        "reg/cornserve-node:9",
        {"pool": "a"},
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"namespace": "ml", "imagee": "x"}))
    with pytest.raises(
        ValueError, match=r"--k8s-settings .*bad.json: imagee: Extra inputs are not permitted"
    ):
        load_k8s_settings(bad)
    with pytest.raises(ValueError, match="cannot read it"):
        load_k8s_settings(tmp_path / "missing.json")


def test_without_an_api_to_talk_to_the_error_says_what_is_needed(tmp_path: Path) -> None:
    with pytest.raises(KubernetesConfigError, match=r"ServiceAccount.*KUBECONFIG"):
        make_spawner("kubernetes", tmp_path, "INFO", k8s_kubeconfig=tmp_path / "no-kubeconfig")


def test_a_kubeconfig_makes_a_kubernetes_spawner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.setenv("CORNSERVE_ALLOW_EXECUTOR_FLAGS", "--host")
    spawner = make_spawner("kubernetes", tmp_path, "DEBUG", k8s_kubeconfig=kubeconfig)
    assert isinstance(spawner, KubernetesSpawner)
    assert spawner.env == {"CORNSERVE_ALLOW_EXECUTOR_FLAGS": "--host"} and spawner.log_level == "DEBUG"
