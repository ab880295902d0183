"""InlineCost and the inline budget: when short CPU work may run on an executor's event loop."""

from __future__ import annotations

import sys

import pytest
import torch

from cornserve.models.inline import InlineCost, inline_budget_s


def test_nothing_runs_inline_before_a_measurement_or_with_no_budget() -> None:
    cost = InlineCost(0.005)
    assert cost.predict_s(10) is None and not cost.runs_inline(10)
    cost.record(100, 0.001, inline=False)  # 10 us per unit
    assert cost.predict_s(10) == pytest.approx(0.0001)
    assert cost.runs_inline(10)
    assert not cost.runs_inline(1000)  # predicted 10 ms: over the 5 ms budget
    cost.record(0, 5.0, inline=False)  # no units: says nothing about the cost per unit
    assert cost.runs_inline(10)
    cost.record(10, 0.01, inline=True)  # the newest measurement wins: 1 ms per unit now
    assert not cost.runs_inline(10) and cost.runs_inline(4)
    assert cost.inline_runs == 1

    never = InlineCost(0.0)
    never.record(100, 0.000001, inline=False)
    assert not never.runs_inline(1)
    with pytest.raises(ValueError, match="budget_s"):
        InlineCost(-1.0)


def test_the_budget_is_the_switch_interval_only_on_a_cpu_with_one_torch_thread() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert inline_budget_s(torch.device("cpu")) == sys.getswitchinterval()
        assert inline_budget_s(torch.device("cuda", 0)) == 0.0
        torch.set_num_threads(2)
        assert inline_budget_s(torch.device("cpu")) == 0.0
    finally:
        torch.set_num_threads(threads)
