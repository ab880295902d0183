"""Paired A/B benchmarks (`cluster_ab.py`, `sidecar_ab.py`, `dispatch_ab.py`): their statistics and
their per-version settings, one place, one method."""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Mapping


def bootstrap_median(values: list[float], rounds: int = 2000, seed: int = 3) -> tuple[float, float]:
    """A percentile bootstrap 95% interval of the median."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds)]


def with_settings(base: Mapping[str, str], option: str, settings: list[str]) -> dict[str, str]:
    """A copy of `base` plus the KEY=VALUE `settings` of one version's `option` (`--this-env`, `--baseline-env`)."""
    env = dict(base)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option} {setting!r}: expected KEY=VALUE")
        env[key] = value
    return env


def add_setting_options(parser: argparse.ArgumentParser, where: str) -> None:
    """`--this-env` and `--baseline-env` (repeatable KEY=VALUE), set `where` for one version only."""
    parser.add_argument(
        "--this-env", action="append", default=[], metavar="KEY=VALUE", help=f"set in this version's {where}"
    )
    parser.add_argument(
        "--baseline-env", action="append", default=[], metavar="KEY=VALUE", help="the same for the baseline"
    )
