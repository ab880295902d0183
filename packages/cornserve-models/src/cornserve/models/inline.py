"""When an executor runs a short piece of CPU work on its event loop instead of a worker thread.

Why: with one torch thread on a CPU slot (the task manager sets `OMP_NUM_THREADS` to the slots, so
one slot gives one), a small model's decode step or a small image's preprocessing and encoding take
a millisecond or two, and the hand-offs to a pool thread and back (submit, the thread's wake-up,
two GIL hand-overs, the loop's self-pipe wake-up) cost on top of it. Work that short holds the GIL
for most of its length anyway, so the loop could do little during it; work that is long must stay
on a thread, or every other request's HTTP reading and sending would wait behind it. The budget
(`inline_budget_s`) is shared by the LLM executor's decode steps (docs/performance.md, "LLM executor
steps on the event loop") and short prefills ("Short prefills on the event loop"), and Eric's
preprocessing and encoding, where running both inline saved 0.1-0.4 ms per one-image request on a
2-core machine ("Eric's short work on the event loop").

How Eric and the LLM executor's prefills decide (`InlineCost`): the cost of a piece of work is
predicted from what it measured before, per *unit* (a pixel of the image for preprocessing, a patch
of the batch for encoding, a prompt token for a prefill) so a big piece after small ones is
predicted big; work runs inline only when the prediction is within
the budget (CPython's GIL switch interval, 5 ms). The first piece of a kind always runs on the
thread (nothing is known yet), and so does everything on a GPU or with several torch threads (the
work then overlaps the loop's, and the budget is 0).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def inline_budget_s(device: torch.device) -> float:
    """The budget for `device`: the switch interval on a CPU with one torch thread, else 0 (never inline)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return sys.getswitchinterval()
    return 0.0


class InlineCost:
    """Predicts one kind of work's seconds from its units, and says whether it may run inline.

    Keeps the latest measurement's seconds per unit (the newest reflects the machine's load now, and
    one outlier is replaced by the next measurement). Work of zero units is predicted free.
    """

    def __init__(self, budget_s: float) -> None:
        if budget_s < 0:
            raise ValueError(f"budget_s must be >= 0, got {budget_s}")
        self.budget_s = budget_s
        self._seconds_per_unit: float | None = None
        self.inline_runs = 0
        """Pieces of work run inline so far (shown in `/info`)."""

    def predict_s(self, units: int) -> float | None:
        """Seconds `units` are expected to take, or None before the first measurement."""
        if self._seconds_per_unit is None:
            return None
        return self._seconds_per_unit * units

    def runs_inline(self, units: int) -> bool:
        """Whether work of `units` runs on the loop: measured before, and predicted within the budget."""
        if self.budget_s <= 0:
            return False
        predicted = self.predict_s(units)
        return predicted is not None and predicted < self.budget_s

    def record(self, units: int, seconds: float, *, inline: bool) -> None:
        """What work of `units` took (inline or on a thread: the work's own time, not the hand-off)."""
        if units > 0:
            self._seconds_per_unit = seconds / units
        if inline:
            self.inline_runs += 1


def timed(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[R, float]:
    """`fn`'s result and the seconds it took, measured on whichever thread calls this (for `record`)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
