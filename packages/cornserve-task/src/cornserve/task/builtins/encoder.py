"""EncoderTask: one modality's encoder tower (+ projector), executed by Eric."""

from __future__ import annotations

import sys
from typing import Any

from pydantic import Field, field_validator

from cornserve.task.base import UnitTask
from cornserve.task.builtins.modality import Modality
from cornserve.task.descriptor import (
    ExecutorLaunchSpec,
    ExecutorPlacement,
    ExecutorRequest,
    TaskExecutionDescriptor,
)
from cornserve.task.errors import InvalidTaskInputError, TaskExecutionError
from cornserve.task.executor_flags import ModelId
from cornserve.task.forward import DataForward, Tensor
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskInput, TaskOutput

DATA_URL_SCHEMES = ("http://", "https://", "data:", "file:")


class EncoderInput(TaskInput):
    """Media to encode, as URLs: `http(s):`, `data:` (base64) or `file:` paths."""

    model_id: str
    data_urls: list[str] = Field(min_length=1)

    @field_validator("data_urls")
    @classmethod
    def _check_schemes(cls, urls: list[str]) -> list[str]:
        for index, url in enumerate(urls):
            if not url.startswith(DATA_URL_SCHEMES):
                shown = url if len(url) <= 60 else url[:57] + "..."
                raise ValueError(f"data_urls[{index}] {shown!r} is not an http(s):, data: or file: URL")
        return urls


class EncoderOutput(TaskOutput):
    """One embedding forward per input item, in input order."""

    embeddings: list[DataForward[Tensor]]


class EncoderTask(UnitTask[EncoderInput, EncoderOutput]):
    """Encode one modality's media into embeddings that are forwarded to a consumer (e.g. an LLM)."""

    default_descriptor = "EricDescriptor"

    modality: Modality
    model_id: ModelId
    max_batch_size: int = Field(default=8, ge=1)

    def validate_input(self, task_input: EncoderInput) -> None:
        """The input must name this task's model."""
        if task_input.model_id != self.model_id:
            raise InvalidTaskInputError(
                f"EncoderInput.model_id {task_input.model_id!r} does not match this EncoderTask's model {self.model_id!r}"
            )

    def make_output_placeholder(self, task_input: EncoderInput) -> EncoderOutput:
        """One fresh forward per item."""
        return EncoderOutput(embeddings=[DataForward[Tensor]() for _ in task_input.data_urls])

    def display_name(self) -> str:
        """E.g. `EncoderTask[image]`."""
        return f"EncoderTask[{self.modality.value}]"


class EricDescriptor(TaskExecutionDescriptor[EncoderTask]):
    """Run an EncoderTask on Eric, Cornserve's multimodal encoder server."""

    tensor_parallel_size: int = Field(default=1, ge=1)

    def num_devices(self, task: EncoderTask) -> int:
        """One device per tensor-parallel rank."""
        return self.tensor_parallel_size

    def launch_spec(self, task: EncoderTask, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """`python -m cornserve.eric ...` on the given devices, with the sidecar ranks to send from."""
        command = [
            sys.executable, "-m", "cornserve.eric",
            "--model-id", task.model_id,
            "--modality", task.modality.value,
            "--max-batch-size", str(task.max_batch_size),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--host", placement.host,
            "--port", str(placement.port),
            "--sidecar-ranks", ",".join(map(str, placement.sidecar_ranks)),
        ]  # fmt: skip
        env = {"CORNSERVE_EXECUTOR_ID": placement.executor_id}
        if placement.nats_url:
            env["CORNSERVE_NATS_URL"] = placement.nats_url
        cuda = [str(d.index) for d in placement.devices if d.kind == "cuda"]
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(cuda)
        return ExecutorLaunchSpec(command=command, env=env, port=placement.port, health_path="/health")

    def to_request(self, task: EncoderTask, invocation: TaskInvocation) -> ExecutorRequest:
        """POST /embeddings: each item with the forward id and destination rank groups to send to."""
        assert isinstance(invocation.task_input, EncoderInput)
        assert isinstance(invocation.task_output, EncoderOutput)
        items = [
            {"url": url, "forward_id": fwd.id, "dst_sidecar_ranks": fwd.dst_sidecar_ranks}
            for url, fwd in zip(
                invocation.task_input.data_urls, invocation.task_output.embeddings, strict=True
            )
        ]
        body = {"model_id": task.model_id, "modality": task.modality.value, "items": items}
        return ExecutorRequest(path="/embeddings", body=body)

    def from_response(self, task: EncoderTask, invocation: TaskInvocation, body: Any) -> EncoderOutput:
        """Eric replies with the ids it sent; the output is the (wired) recorded forwards."""
        assert isinstance(invocation.task_output, EncoderOutput)
        expected = [f.id for f in invocation.task_output.embeddings]
        sent = body.get("forward_ids") if isinstance(body, dict) else None
        if sent != expected:
            raise TaskExecutionError(f"Eric reported sending {sent!r}, expected {expected!r}")
        return invocation.task_output
