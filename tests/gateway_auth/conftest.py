"""One local cluster behind an HTTPS gateway with two API keys, shared by the gateway-auth tests.

The certificate is self-signed for 127.0.0.1 (made with the `openssl` command); the cluster runs one
CPU slot and one dispatcher, which is all an app without unit tasks needs.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.support.cluster import running_local_cluster

from cornserve.cli.launcher import LocalCluster
from cornserve.runtime.secrets import new_token


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate (its own CA) and its private key, PEM files."""

    cert: Path
    key: Path


def self_signed_certificate(directory: Path) -> Certificate:
    """A throwaway certificate for 127.0.0.1 and localhost; skips the test when `openssl` is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the `openssl` command is needed to make a self-signed certificate for the TLS tests")
    cert, key = directory / "gateway.crt", directory / "gateway.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=cornserve-test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    key.chmod(0o600)
    return Certificate(cert, key)


@pytest.fixture(scope="package")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """The self-signed certificate the shared cluster's gateway serves."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="package")
def api_keys() -> tuple[str, str]:
    """The shared cluster's two invoke keys."""
    return new_token(), new_token()


@pytest.fixture(scope="package")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, certificate: Certificate, api_keys: tuple[str, str]
) -> Iterator[LocalCluster]:
    """The shared HTTPS cluster with `api_keys` as invoke keys (nothing of it may survive it)."""
    with pytest.MonkeyPatch.context() as env:
        # The children inherit the launcher's environment: the gateway reads its API keys from it.
        env.setenv("CORNSERVE_API_KEYS", ",".join(api_keys))
        for name in ("CORNSERVE_ADMIN_TOKEN", "CORNSERVE_API_KEY", "CORNSERVE_STATE_DIR"):
            env.delenv(name, raising=False)
        with running_local_cluster(
            tmp_path_factory.mktemp("auth-cluster"),
            cpu_slots=1,
            dispatchers=1,
            tls=(certificate.cert, certificate.key),
        ) as cluster:
            env.delenv("CORNSERVE_API_KEYS")
            yield cluster
