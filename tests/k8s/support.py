"""Offline Kubernetes checks: schema validation of a stated API version and a tiny kustomize renderer.

`kubernetes-validate` bundles the API's JSON schemas; strict mode refuses unknown fields, so a
misspelt key fails as it would fail `kubectl apply --validate=strict`. The schemas check structure
and types, not the API server's semantic rules (name syntax, label values, selectors matching
templates): `check_names` and the manifest tests check those that matter here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

K8S_VERSION = "1.37.0"
"""The Kubernetes API version every manifest and pod spec is validated against."""
K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"

SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def validate(doc: dict[str, Any]) -> None:
    """Raise AssertionError with the schema's complaint if `doc` is not a valid object of K8S_VERSION."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        meta = doc.get("metadata", {})
        name = meta.get("name") or meta.get("generateName")
        raise AssertionError(f"{doc.get('kind')} {name}: at {where or '<root>'}: {exc.message}") from None


def check_names(doc: dict[str, Any]) -> None:
    """The API server's name and label rules the schemas do not carry."""
    meta = doc["metadata"]
    if "name" in meta:
        assert len(meta["name"]) <= 253 and DNS_SUBDOMAIN.match(meta["name"]), meta["name"]
    if "generateName" in meta:
        # The server appends 5 characters; a pod's name is also its hostname (a DNS label).
        prefix = meta["generateName"]
        assert len(prefix) + 5 <= 63 and DNS_LABEL.match(prefix + "abcde"), prefix
    for labels in _label_maps(doc):
        for key, value in labels.items():
            prefix, _, name = key.rpartition("/")
            assert not prefix or (len(prefix) <= 253 and DNS_SUBDOMAIN.match(prefix)), key
            assert len(name) <= 63 and LABEL_KEY_NAME.match(name), key
            assert isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.match(value), (key, value)


def _label_maps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    maps = [doc["metadata"].get("labels") or {}]
    spec = doc.get("spec") or {}
    template = spec.get("template") or {}
    maps.append((template.get("metadata") or {}).get("labels") or {})
    maps.append(spec.get("nodeSelector") or {})
    maps.append((template.get("spec") or {}).get("nodeSelector") or {})
    return maps


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file (empty ones dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build` for the subset deploy/k8s uses: resources, namespace, labels, images.

    No kustomize binary is assumed on the test machine; the renderer refuses any kustomization key
    it does not implement, so a new key cannot be silently ignored by the test.
    """
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED_KUSTOMIZE_KEYS
    assert not unknown, f"the test's renderer does not implement {sorted(unknown)}: extend it"
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    docs: list[dict[str, Any]] = []
    for resource in kust["resources"]:
        docs += load_documents(directory / resource)
    namespace = kust.get("namespace")
    extra_labels: dict[str, str] = {}
    for entry in kust.get("labels", []):
        assert set(entry) <= {"pairs"}, f"label options {sorted(entry)} are not implemented by the renderer"
        extra_labels.update(entry["pairs"])
    images = {i["name"]: i for i in kust.get("images", [])}
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = namespace
        if doc["kind"] == "Namespace" and namespace:
            meta["name"] = namespace
        if extra_labels:
            meta["labels"] = {**(meta.get("labels") or {}), **extra_labels}
        if namespace and doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in doc.get("subjects", []):
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = namespace
        for container in pod_containers(doc):
            name, _, tag = container["image"].partition(":")
            if name in images:
                image = images[name]
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a Pod or of a workload's template (None for other kinds)."""
    if doc["kind"] == "Pod":
        return doc["spec"]
    spec = doc.get("spec") or {}
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template")
    return template["spec"] if template else None


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container and init container of a Pod or workload."""
    spec = pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec.get("containers", [])]
