"""`--sidecar-ranks` is parsed the same way by every executor's command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pytest

from cornserve.bus.lifecycle import required_sidecar_ranks_arg, sidecar_ranks_arg
from cornserve.eric.main import parse_args as eric_args
from cornserve.executor.main import parse_args as executor_args
from cornserve.llm_executor.config import build_parser as llm_parser
from cornserve.vllm.__main__ import parse_args as vllm_args


def test_rank_lists() -> None:
    assert sidecar_ranks_arg("3,4") == [3, 4]
    assert sidecar_ranks_arg(" 5 , ") == [5]
    assert sidecar_ranks_arg("") == []
    for bad in ("a", "1,-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            sidecar_ranks_arg(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="at least one"):
        required_sidecar_ranks_arg("")


PARSERS: dict[str, tuple[Callable[[list[str]], Any], list[str]]] = {
    "eric": (eric_args, ["--model-id", "m", "--modality", "image", "--port", "1"]),
    "executor": (executor_args, ["--task-json", "{}", "--executor-id", "e", "--port", "1"]),
    "llm": (lambda argv: llm_parser().parse_args(argv), ["--model-id", "m", "--port", "1"]),
    "vllm": (vllm_args, ["--model-id", "m", "--port", "1"]),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_executor_refuses_bad_ranks_with_a_usage_error(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parse, required = PARSERS[name]
    with pytest.raises(SystemExit) as exit_:
        parse([*required, "--sidecar-ranks", "0,x"])
    assert exit_.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
