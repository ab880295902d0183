"""Statistics of paired A/B benchmarks (`cluster_ab.py`, `sidecar_ab.py`): one place, one method."""

from __future__ import annotations

import random
import statistics


def bootstrap_median(values: list[float], rounds: int = 2000, seed: int = 3) -> tuple[float, float]:
    """A percentile bootstrap 95% interval of the median."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds)]
