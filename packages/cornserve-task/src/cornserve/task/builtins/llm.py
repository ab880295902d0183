"""LLMTask: an LLM (optionally multimodal) that streams a chat completion.

`LLMCompletionTask` is the same LLM answering with one whole completion.
"""

from __future__ import annotations

import json
import sys
from abc import abstractmethod
from typing import Any

from pydantic import Field, PrivateAttr

from cornserve.task.base import UnitTask
from cornserve.task.builtins.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionMessage,
)
from cornserve.task.builtins.modality import Modality
from cornserve.task.descriptor import (
    ExecutorLaunchSpec,
    ExecutorPlacement,
    ExecutorRequest,
    TaskExecutionDescriptor,
)
from cornserve.task.errors import TaskExecutionError
from cornserve.task.executor_flags import ModelId
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskOutput
from cornserve.task.stream import Stream


class LLMTask(UnitTask[ChatCompletionRequest, Stream[ChatCompletionChunk]]):
    """Generate a chat completion, streamed as OpenAI chunks.

    With `receive_embeddings=True` the media of a request arrive as embedding forwards from
    encoder tasks (encoder fission); otherwise the executor encodes the `modalities` it is given.
    """

    default_descriptor = "CPULLMDescriptor"

    model_id: ModelId
    receive_embeddings: bool = False
    modalities: list[Modality] = Field(default_factory=list)

    def validate_input(self, task_input: ChatCompletionRequest) -> None:
        """Media must arrive the way this task is configured to take them."""
        task_input.check_media_inputs(f"LLMTask({self.model_id})", self.receive_embeddings, self.modalities)

    def make_output_placeholder(self, task_input: ChatCompletionRequest) -> Stream[ChatCompletionChunk]:
        """The completion streams."""
        return Stream[ChatCompletionChunk].placeholder(self.display_name())

    def display_name(self) -> str:
        """E.g. `LLMTask[embeddings]` for an encoder-fission LLM."""
        return "LLMTask[embeddings]" if self.receive_embeddings else "LLMTask"


class LLMCompletionTask(LLMTask):
    """The same LLM as an `LLMTask` of equal configuration, answering with one `ChatCompletion`.

    Its output is a value, not a stream, so it can sit anywhere in a graph (e.g. one of several
    LLMs answering side by side, or a middle step whose text the app reads before its next call).
    It shares the deployment of the streaming `LLMTask` with the same configuration (equal
    `deployment_key`): the executor answers `stream: false` requests too.
    """

    _streaming: LLMTask | None = PrivateAttr(default=None)

    @classmethod
    def output_cls(cls) -> type[TaskOutput]:
        """A whole completion, not a stream of chunks."""
        return ChatCompletion

    def streaming(self) -> LLMTask:
        """The streaming `LLMTask` of the same configuration (whose deployment this task uses)."""
        if self._streaming is None:
            fields = {name: getattr(self, name) for name in LLMTask.model_fields}
            self._streaming = LLMTask(**fields)
        return self._streaming

    @property
    def deployment_key(self) -> str:
        """The streaming twin's key: one deployment serves both."""
        return self.streaming().deployment_key

    def make_output_placeholder(self, task_input: ChatCompletionRequest) -> ChatCompletion:  # type: ignore[override]
        """Every field of the completion exists only after the graph ran."""
        return super(LLMTask, self).make_output_placeholder(task_input)  # type: ignore[return-value]

    def traced_output(self, task_input: ChatCompletionRequest) -> ChatCompletion:  # type: ignore[override]
        """A completion that says it was traced, so tracing an app goes on past reading its text."""
        text = f"<the answer of {self.display_name()} ({self.model_id}): traced, not generated>"
        return ChatCompletion(
            id="traced",
            created=0,
            model=self.model_id,
            choices=[CompletionChoice(message=CompletionMessage(content=text), finish_reason="stop")],
        )

    def display_name(self) -> str:
        """E.g. `LLMCompletionTask[embeddings]`."""
        return "LLMCompletionTask[embeddings]" if self.receive_embeddings else "LLMCompletionTask"


def _sse_data(line: str) -> str | None:
    """The data of one server-sent-events line; None for blanks, comments, other fields and `[DONE]`."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    return None if data == "[DONE]" else data


def _chunk_payload(data: str) -> dict[str, Any]:
    """One streamed chunk's JSON object; an error line (or anything but an object) raises."""
    payload = json.loads(data)
    if not isinstance(payload, dict):
        raise TaskExecutionError(f"the LLM executor streamed {type(payload).__name__}, not a JSON object")
    if "error" in payload:
        error = payload["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise TaskExecutionError(f"the LLM executor failed: {message}")
    return payload


class OpenAIChatDescriptor(TaskExecutionDescriptor[LLMTask]):
    """Shared request/stream translation for executors that speak OpenAI's chat-completions API."""

    def to_request(self, task: LLMTask, invocation: TaskInvocation) -> ExecutorRequest:
        """POST /v1/chat/completions with the embedding forwards if any.

        Streaming with usage for an `LLMTask`, one completion for an `LLMCompletionTask`.
        """
        request = invocation.task_input
        assert isinstance(request, ChatCompletionRequest)
        streams = not isinstance(task, LLMCompletionTask)
        body = request.openai_body()
        body["model"] = task.model_id
        body["stream"] = streams
        if streams:
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        if request.cornserve_embeddings:
            body["cornserve_embeddings"] = [f.model_dump(mode="json") for f in request.cornserve_embeddings]
        return ExecutorRequest(path="/v1/chat/completions", body=body, stream=streams)

    def from_stream_line(
        self, task: LLMTask, invocation: TaskInvocation, line: str
    ) -> ChatCompletionChunk | None:
        """Parse one server-sent-events line: `data: {...}` → a chunk; `[DONE]` and blanks are skipped."""
        data = _sse_data(line)
        return None if data is None else ChatCompletionChunk.model_validate(_chunk_payload(data))

    def stream_item_json(self, task: LLMTask, invocation: TaskInvocation, line: str) -> bytes | None:
        """The chunk's JSON as the executor sent it, once it parsed as one JSON object.

        The relay's per-token path: no `ChatCompletionChunk` is built here, the caller validates
        each chunk once (against the stream's item type).
        """
        data = _sse_data(line)
        if data is None:
            return None
        _chunk_payload(data)
        return data.encode()

    def from_response(self, task: LLMTask, invocation: TaskInvocation, body: Any) -> ChatCompletion:
        """An `LLMCompletionTask`'s one completion (an `LLMTask`'s response always streams)."""
        if not isinstance(task, LLMCompletionTask):
            raise TaskExecutionError("LLMTask responses are streamed; a non-streamed response was received")
        if isinstance(body, dict) and "error" in body:
            error = body["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise TaskExecutionError(f"the LLM executor failed: {message}")
        return ChatCompletion.model_validate(body)

    @abstractmethod
    def launch_spec(self, task: LLMTask, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """The executor process."""


def vllm_serve_flags(
    host: str, port: int, tensor_parallel_size: int, gpu_memory_utilization: float, max_model_len: int | None
) -> list[str]:
    """The `vllm serve` flags Cornserve decides (the `cornserve.vllm` proxy takes the same ones)."""
    flags = [
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
    ]  # fmt: skip
    if max_model_len is not None:
        flags += ["--max-model-len", str(max_model_len)]
    return flags


class VLLMDescriptor(OpenAIChatDescriptor):
    """Run an LLMTask with `vllm serve` on GPUs (see docs/tasks.md for the embedding hand-off)."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=1)
    extra_args: list[str] = Field(default_factory=list)
    ready_timeout_s: float = Field(default=1800.0, gt=0)
    """How long vLLM may take to become healthy: a first start of a large tensor-parallel model
    downloads, compiles and captures CUDA graphs for many minutes. The gateway's deploy deadline
    (`--deploy-timeout`) bounds a deployment too; raise both for such a model."""

    def num_devices(self, task: LLMTask) -> int:
        """One GPU per tensor-parallel rank."""
        return self.tensor_parallel_size

    def executor_args(self) -> list[str]:
        """`extra_args` reach `vllm serve` as they are (and come after Cornserve's own flags)."""
        return list(self.extra_args)

    def launch_spec(self, task: LLMTask, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """`vllm serve MODEL ...` on the allocated GPUs; behind Cornserve's proxy with encoder fission.

        vLLM cannot pull embeddings from a sidecar, so an LLMTask with `receive_embeddings=True`
        runs `python -m cornserve.vllm`, which receives them and hands them to `vllm serve
        --enable-mm-embeds` as `image_embeds` / `audio_embeds` content parts (docs/executors.md).
        """
        if any(d.kind != "cuda" for d in placement.devices):
            raise TaskExecutionError("VLLMDescriptor needs GPU devices; use CPULLMDescriptor on CPU slots")
        flags = vllm_serve_flags(
            placement.host,
            placement.port,
            self.tensor_parallel_size,
            self.gpu_memory_utilization,
            self.max_model_len,
        )
        if task.receive_embeddings:
            sidecar_ranks = ",".join(map(str, placement.sidecar_ranks))
            command = [sys.executable, "-m", "cornserve.vllm", "--model-id", task.model_id]
            command += [
                "--sidecar-ranks",
                sidecar_ranks,
                "--ready-timeout",
                str(self.ready_timeout_s),
                *flags,
            ]
            if self.extra_args:
                command += ["--", *self.extra_args]
        else:
            command = ["vllm", "serve", task.model_id, *flags, *self.extra_args]
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(str(d.index) for d in placement.devices),
            "CORNSERVE_SIDECAR_RANKS": ",".join(map(str, placement.sidecar_ranks)),
            "CORNSERVE_EXECUTOR_ID": placement.executor_id,
        }
        if placement.nats_url:
            env["CORNSERVE_NATS_URL"] = placement.nats_url
        return ExecutorLaunchSpec(
            command=command,
            env=env,
            port=placement.port,
            health_path="/health",
            ready_timeout_s=self.ready_timeout_s,
        )


class CPULLMDescriptor(OpenAIChatDescriptor):
    """Run an LLMTask on Cornserve's CPU LLM executor (Hugging Face transformers)."""

    max_batch_size: int = Field(default=8, ge=1)

    def launch_spec(self, task: LLMTask, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """`python -m cornserve.llm_executor ...` with the sidecar ranks to receive embeddings on."""
        command = [
            sys.executable, "-m", "cornserve.llm_executor",
            "--model-id", task.model_id,
            "--host", placement.host,
            "--port", str(placement.port),
            "--max-batch-size", str(self.max_batch_size),
            "--sidecar-ranks", ",".join(map(str, placement.sidecar_ranks)),
        ]  # fmt: skip
        if task.receive_embeddings:
            command.append("--receive-embeddings")
        env = {"CORNSERVE_EXECUTOR_ID": placement.executor_id}
        if placement.nats_url:
            env["CORNSERVE_NATS_URL"] = placement.nats_url
        return ExecutorLaunchSpec(command=command, env=env, port=placement.port, health_path="/health")
