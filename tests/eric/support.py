"""Eric's test fixtures' handles and its JSON-over-HTTP helper."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import ServiceProcess


def http_json(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Eric:
    """One Eric server: its process, URL, checkpoint and the sidecar rank it sends from."""

    service: ServiceProcess
    url: str
    model_dir: Path
    src_rank: int


@dataclass
class EricSetup:
    """The session's Erics, the rank tests receive embeddings on, and the Eric that must fail to start."""

    nats_url: str
    dst_rank: int
    erics: dict[str, Eric]
    failed: ServiceProcess
