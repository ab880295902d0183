"""Exactly one logging set-up and one NATS connect in the product, both in cornserve.runtime."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[2] / "packages"
RUNTIME = PACKAGES / "cornserve-runtime" / "src" / "cornserve" / "runtime"


def occurrences(pattern: str) -> list[Path]:
    found = []
    for path in sorted(PACKAGES.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        found += [path] * len(re.findall(pattern, text))
    return found


def test_one_basic_config() -> None:
    assert occurrences(r"\bbasicConfig\(") == [RUNTIME / "logging.py"]


def test_one_nats_connect() -> None:
    assert occurrences(r"\bnats\.connect\(") == [RUNTIME / "nats.py"]


def test_the_scan_sees_the_product() -> None:
    assert len(occurrences(r"^def |\ndef ")) > 100
