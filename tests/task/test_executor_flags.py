"""The executor-flag policy: task configs cannot pass flags that widen an executor's exposure."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cornserve.task import ExecutorFlagError, ExecutorPlacement
from cornserve.task.builtins import CPULLMDescriptor, EncoderTask, LLMTask, VLLMDescriptor
from cornserve.task.descriptor import Device
from cornserve.task.executor_flags import (
    ALLOW_SETTING,
    EXPOSURE_FLAGS,
    check_allowed_names,
    check_executor_flags,
    refused_flags,
)


def vllm_task(*extra: str) -> LLMTask:
    return LLMTask(model_id="org/model", descriptor=VLLMDescriptor(extra_args=list(extra)))


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--host", "0.0.0.0"], "--host"),
        (["--host=0.0.0.0"], "--host"),
        (["--ho", "0.0.0.0"], "--host"),  # argparse expands an unambiguous prefix
        (["--trust-remote-code"], "--trust-remote-code"),
        (["--trust-remote"], "--trust-remote-code"),
        (["--trust_remote_code"], "--trust-remote-code"),  # vLLM reads underscores as dashes
        (["--TRUST-REMOTE-CODE"], "--trust-remote-code"),
        (["--allowed-local-media-path", "/"], "--allowed-local-media-path"),
        (["--kv-events-config.endpoint=tcp://*:5557"], "--kv-events-config"),  # dotted JSON key
        (["--config", "/tmp/any.yaml"], "--config"),
        (["--served-model-name", "--host"], "--host"),  # even as another flag's value
    ],
)
def test_denied_flags_are_refused_in_every_spelling(args: list[str], flag: str) -> None:
    assert flag in {f for _, f in refused_flags(args)}
    with pytest.raises(ExecutorFlagError) as info:
        check_executor_flags(vllm_task(*args))
    assert info.value.flag == flag
    message = str(info.value)
    assert "VLLMDescriptor" in message and f"{ALLOW_SETTING}={flag}" in message


@pytest.mark.parametrize(
    "args",
    [
        ["--enforce-eager"],
        ["--max-model-len", "4096", "--dtype=half"],
        ["--hostname-is-not-a-vllm-flag"],  # longer than --host: argparse does not read it as --host
        ["--config-format", "auto"],  # another flag, not --config
        ["--no-trust-remote-code"],  # narrows
        ["--api-key", "secret"],  # narrows
        ["-tp", "2", "--", "--"],
    ],
)
def test_flags_that_do_not_widen_exposure_pass(args: list[str]) -> None:
    assert refused_flags(args) == []
    check_executor_flags(vllm_task(*args))


def test_the_admin_setting_allows_exactly_the_flags_it_names() -> None:
    allowed = check_allowed_names(["--host", " --trust_remote_code "])
    assert allowed == ["--host", "--trust-remote-code"]
    check_executor_flags(vllm_task("--host", "0.0.0.0", "--trust-remote"), allowed)
    with pytest.raises(ExecutorFlagError) as info:
        check_executor_flags(vllm_task("--host", "0.0.0.0", "--allowed-local-media-path=/"), allowed)
    assert info.value.flag == "--allowed-local-media-path"


def test_the_admin_setting_refuses_entries_that_are_not_denied_flags() -> None:
    with pytest.raises(ValueError, match=ALLOW_SETTING):
        check_allowed_names(["--port"])
    assert check_allowed_names(["", " "]) == []
    assert set(check_allowed_names(EXPOSURE_FLAGS)) == set(EXPOSURE_FLAGS)


def test_descriptors_without_pass_through_arguments_pass() -> None:
    check_executor_flags(LLMTask(model_id="org/model", descriptor=CPULLMDescriptor()))
    assert CPULLMDescriptor().executor_args() == []


def test_an_allowed_flag_reaches_the_vllm_command_line() -> None:
    task = vllm_task("--host", "0.0.0.0")
    check_executor_flags(task, check_allowed_names(["--host"]))
    placement = ExecutorPlacement(
        executor_id="e", port=8100, devices=[Device(kind="cuda", index=0)], sidecar_ranks=[0]
    )
    command = task.descriptor.launch_spec(task, placement).command
    assert command[-2:] == ["--host", "0.0.0.0"]


@pytest.mark.parametrize("model_id", ["--trust-remote-code", "-h", "--host=0.0.0.0"])
def test_model_ids_cannot_be_options(model_id: str) -> None:
    """`vllm serve MODEL` takes the model id as a positional argument: `-...` would be read as a flag."""
    with pytest.raises(ValidationError, match="starts with '-'"):
        LLMTask(model_id=model_id)
    with pytest.raises(ValidationError, match="starts with '-'"):
        EncoderTask(model_id=model_id, modality="image")
