"""`--sidecar-ranks` is one validated settings type, parsed the same way by every executor's command line."""

from __future__ import annotations

import pytest

from cornserve.eric.settings import EricSettings
from cornserve.executor.settings import PythonExecutorSettings
from cornserve.llm_executor.config import LLMExecutorSettings
from cornserve.runtime.settings import ServiceSettings, parse_settings
from cornserve.vllm.__main__ import VLLMProxySettings, split_vllm_args

SETTINGS: dict[str, tuple[type[ServiceSettings], list[str]]] = {
    "eric": (EricSettings, ["--model-id", "m", "--modality", "image", "--port", "1"]),
    "executor": (PythonExecutorSettings, ["--task-json", "{}", "--executor-id", "e", "--port", "1"]),
    "llm": (LLMExecutorSettings, ["--model-id", "m", "--port", "1"]),
    "vllm": (VLLMProxySettings, ["--model-id", "m", "--port", "1"]),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_rank_lists(name: str) -> None:
    settings_type, required = SETTINGS[name]
    parsed = parse_settings(settings_type, [*required, "--sidecar-ranks", " 3, 4,"])
    assert getattr(parsed, "sidecar_ranks") == [3, 4]  # noqa: B009


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize(("bad", "message"), [("0,x", "comma-separated integers"), ("1,-2", "must be >= 0")])
def test_every_executor_refuses_bad_ranks_with_a_usage_error(
    name: str, bad: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings_type, required = SETTINGS[name]
    with pytest.raises(SystemExit) as exit_:
        parse_settings(settings_type, [*required, "--sidecar-ranks", bad])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["eric", "vllm"])
def test_executors_that_need_a_sidecar_refuse_none(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    settings_type, required = SETTINGS[name]
    with pytest.raises(SystemExit) as exit_:
        parse_settings(settings_type, [*required, "--sidecar-ranks", ""])
    assert exit_.value.code == 2
    assert "at least one sidecar rank" in capsys.readouterr().err


def test_vllm_arguments_after_the_separator_are_passed_through() -> None:
    own, rest = split_vllm_args(["--model-id", "m", "--", "--enforce-eager", "--port", "9"])
    assert (own, rest) == (["--model-id", "m"], ["--enforce-eager", "--port", "9"])
