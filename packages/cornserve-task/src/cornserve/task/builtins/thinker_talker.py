"""ThinkerTask and TalkerTask: an LLM whose per-token hidden states stream to a model that generates from them.

The *thinker* runs a chat request like `LLMTask` and, while it generates, forwards the last-layer
hidden state of every generated token, in order, through the sidecar: one `DataForward[Stream[Tensor]]` whose chunk `i` is a float32 tensor of
`[rows, hidden]` (`tokens_per_chunk` rows, fewer in the last chunk), closed with the sidecar's
`close_stream` after the last token. The *talker* takes that forward as its input and generates
one token per hidden state, starting on the first one (the rule is in
`cornserve.models.thinker_talker`); its tokens stream to the caller as `TalkerChunk`s.

The thinker's output is the forward alone (its text is not returned): an output of forwards only
lets a graph runner that supports it run the thinker as the graph's tail, so the caller reads the
talker's first token before the thinker has finished.

Both run on the CPU LLM executor (`CPUThinkerDescriptor`, `CPUTalkerDescriptor`); vLLM can take
neither role (its server returns no per-token hidden states and takes input embeddings only as a
whole prompt), and the vLLM proxy refuses both requests with a 400 saying so.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cornserve.task.base import Task, UnitTask
from cornserve.task.builtins.chat import ChatCompletion, ChatCompletionRequest
from cornserve.task.builtins.modality import Modality
from cornserve.task.descriptor import (
    ExecutorLaunchSpec,
    ExecutorPlacement,
    ExecutorRequest,
    TaskExecutionDescriptor,
)
from cornserve.task.errors import TaskExecutionError
from cornserve.task.executor_flags import ModelId
from cornserve.task.forward import DataForward, Tensor
from cornserve.task.invocation import TaskInvocation
from cornserve.task.io_models import TaskInput, TaskOutput
from cornserve.task.stream import Stream

HIDDEN_STATES_FIELD = "cornserve_hidden_states"
"""The chat request field (a `HiddenStatesTarget`) that asks the LLM executor to forward hidden states."""
GENERATE_FROM_EMBEDS_PATH = "/v1/generate_from_embeds"
"""The LLM executor's route for generation conditioned on a stream of input embeddings (the talker)."""


class HiddenStatesTarget(BaseModel):
    """Where a thinker's per-token hidden states go: the stream forward (wired) and its chunking."""

    model_config = ConfigDict(extra="forbid")

    forward: DataForward[Stream[Tensor]]
    tokens_per_chunk: int = Field(default=1, ge=1, le=1024)
    window: int = Field(default=16, ge=1, le=4096)
    """Chunks the thinker may have outstanding (not yet read by the talker) before it waits (`StreamWriter`)."""


class EmbedsGenerationRequest(BaseModel):
    """The body of `POST /v1/generate_from_embeds`: generate one token per streamed input embedding."""

    model_config = ConfigDict(extra="forbid")

    input_embeds: DataForward[Stream[Tensor]]
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default: the executor's `--default-max-tokens`)."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """0 or unset: greedy."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None


class ThinkerOutput(TaskOutput):
    """The thinker's hidden states, forwarded to one consumer (the talker), one chunk per `tokens_per_chunk` tokens."""

    hidden_states: DataForward[Stream[Tensor]]


class TalkerInput(TaskInput):
    """The hidden-state stream to generate from, with sampling options (greedy by default)."""

    hidden_states: DataForward[Stream[Tensor]]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None


class TalkerChunk(TaskOutput):
    """One talker token (or, with `token_id` None, only the end of the stream)."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(ge=0)
    """The token's position in the talker's output."""
    token_id: int | None
    text: str = ""
    """The token's text by the talker's tokenizer (may be empty until a character is complete)."""
    finish_reason: str | None = None
    """On the last chunk: "stop" (end-of-sequence token or the hidden states ran out) or "length"."""
    inputs_received: int = Field(ge=0)
    """Hidden states the talker had read from the stream by the time it made this token."""
    inputs_complete: bool = False
    """Whether the talker had seen the end of the stream by the time it made this token."""


class ThinkerTask(UnitTask[ChatCompletionRequest, ThinkerOutput]):
    """An LLM answering a chat request and forwarding each generated token's last-layer hidden state."""

    default_descriptor = "CPUThinkerDescriptor"

    model_id: ModelId
    receive_embeddings: bool = False
    modalities: list[Modality] = Field(default_factory=list)
    tokens_per_chunk: int = Field(default=1, ge=1, le=1024)
    """Hidden states per sidecar chunk (1: each token's state travels as soon as it exists)."""
    stream_window: int = Field(default=16, ge=1, le=4096)
    """Chunks the thinker may send ahead of what the talker has read (backpressure)."""

    def validate_input(self, task_input: ChatCompletionRequest) -> None:
        """Media must arrive the way this task is configured to take them (as for `LLMTask`)."""
        task_input.check_media_inputs(
            f"ThinkerTask({self.model_id})", self.receive_embeddings, self.modalities
        )


class TalkerTask(UnitTask[TalkerInput, Stream[TalkerChunk]]):
    """A causal LM generating one token per hidden state streamed from a `ThinkerTask`."""

    default_descriptor = "CPUTalkerDescriptor"

    model_id: ModelId

    def make_output_placeholder(self, task_input: TalkerInput) -> Stream[TalkerChunk]:
        """The talker's tokens stream."""
        return Stream[TalkerChunk].placeholder("TalkerTask")


class ThinkerTalkerTask(Task[ChatCompletionRequest, Stream[TalkerChunk]]):
    """A thinker LLM whose hidden states stream to a talker: the talker's tokens are the result.

    One recorded graph of two unit tasks joined by one stream forward: `ThinkerTask` → (hidden
    states, chunk by chunk through the sidecar) → `TalkerTask`. The talker's hidden size must equal
    the thinker's (its executor refuses rows of another width).
    """

    thinker_model_id: ModelId
    talker_model_id: ModelId
    tokens_per_chunk: int = Field(default=1, ge=1, le=1024)
    talker_max_tokens: int | None = Field(default=None, ge=1)
    """Most talker tokens (default: the talker executor's `--default-max-tokens`)."""

    def post_init(self) -> None:
        """The two unit tasks (each deployed once, shared by equal configurations)."""
        self.thinker = ThinkerTask(model_id=self.thinker_model_id, tokens_per_chunk=self.tokens_per_chunk)
        self.talker = TalkerTask(model_id=self.talker_model_id)

    def invoke(self, task_input: ChatCompletionRequest) -> Stream[TalkerChunk]:
        """Think, and talk from the thinker's hidden states as they come."""
        thought = self.thinker.invoke(task_input.model_copy(update={"model": self.thinker_model_id}))
        return self.talker.invoke(
            TalkerInput(hidden_states=thought.hidden_states, max_tokens=self.talker_max_tokens)
        )


def _llm_executor_command(
    model_id: str, placement: ExecutorPlacement, max_batch_size: int, flags: list[str]
) -> ExecutorLaunchSpec:
    command = [
        sys.executable, "-m", "cornserve.llm_executor",
        "--model-id", model_id,
        "--host", placement.host,
        "--port", str(placement.port),
        "--max-batch-size", str(max_batch_size),
        "--sidecar-ranks", ",".join(map(str, placement.sidecar_ranks)),
        *flags,
    ]  # fmt: skip
    env = {"CORNSERVE_EXECUTOR_ID": placement.executor_id}
    if placement.nats_url:
        env["CORNSERVE_NATS_URL"] = placement.nats_url
    return ExecutorLaunchSpec(command=command, env=env, port=placement.port, health_path="/health")


def _error_message(payload: Any) -> str | None:
    if isinstance(payload, dict) and "error" in payload:
        error = payload["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    return None


class CPUThinkerDescriptor(TaskExecutionDescriptor[ThinkerTask]):
    """Run a ThinkerTask on the CPU LLM executor (`--forward-hidden-states`)."""

    max_batch_size: int = Field(default=8, ge=1)

    def launch_spec(self, task: ThinkerTask, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """`python -m cornserve.llm_executor ... --forward-hidden-states`."""
        flags = ["--forward-hidden-states"]
        if task.receive_embeddings:
            flags.append("--receive-embeddings")
        return _llm_executor_command(task.model_id, placement, self.max_batch_size, flags)

    def to_request(self, task: ThinkerTask, invocation: TaskInvocation) -> ExecutorRequest:
        """A non-streamed chat completion carrying the (wired) hidden-state forward."""
        request = invocation.task_input
        output = invocation.task_output
        assert isinstance(request, ChatCompletionRequest) and isinstance(output, ThinkerOutput)
        body = request.openai_body()
        body["model"] = task.model_id
        body["stream"] = False
        body.pop("stream_options", None)
        if request.cornserve_embeddings:
            body["cornserve_embeddings"] = [f.model_dump(mode="json") for f in request.cornserve_embeddings]
        target = HiddenStatesTarget(
            forward=output.hidden_states, tokens_per_chunk=task.tokens_per_chunk, window=task.stream_window
        )
        body[HIDDEN_STATES_FIELD] = target.model_dump(mode="json")
        return ExecutorRequest(path="/v1/chat/completions", body=body)

    def from_response(self, task: ThinkerTask, invocation: TaskInvocation, body: Any) -> ThinkerOutput:
        """The (wired) forward: the executor answers once every hidden state reached the talker's sidecar."""
        output = invocation.task_output
        assert isinstance(output, ThinkerOutput)
        message = _error_message(body)
        if message is not None:
            raise TaskExecutionError(f"the thinker's LLM executor failed: {message}")
        ChatCompletion.model_validate(body)  # the executor's answer is a chat completion, or it failed
        return output


class CPUTalkerDescriptor(TaskExecutionDescriptor[TalkerTask]):
    """Run a TalkerTask on the CPU LLM executor (`--receive-input-embeds`)."""

    max_batch_size: int = Field(default=8, ge=1)

    def launch_spec(self, task: TalkerTask, placement: ExecutorPlacement) -> ExecutorLaunchSpec:
        """`python -m cornserve.llm_executor ... --receive-input-embeds`."""
        return _llm_executor_command(
            task.model_id, placement, self.max_batch_size, ["--receive-input-embeds"]
        )

    def to_request(self, task: TalkerTask, invocation: TaskInvocation) -> ExecutorRequest:
        """`POST /v1/generate_from_embeds`, streamed."""
        talker_input = invocation.task_input
        assert isinstance(talker_input, TalkerInput)
        body = EmbedsGenerationRequest(
            input_embeds=talker_input.hidden_states,
            max_tokens=talker_input.max_tokens,
            temperature=talker_input.temperature,
            top_p=talker_input.top_p,
            seed=talker_input.seed,
        )
        return ExecutorRequest(path=GENERATE_FROM_EMBEDS_PATH, body=body.model_dump(mode="json"), stream=True)

    def from_stream_line(self, task: TalkerTask, invocation: TaskInvocation, line: str) -> TalkerChunk | None:
        """`data: {TalkerChunk}` → the chunk; `[DONE]`, comments and blanks are skipped; an error line raises."""
        line = line.strip()
        if not line.startswith("data:"):
            return None
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return None
        payload = json.loads(data)
        message = _error_message(payload)
        if message is not None:
            raise TaskExecutionError(f"the talker's LLM executor failed: {message}")
        return TalkerChunk.model_validate(payload)

    def from_response(self, task: TalkerTask, invocation: TaskInvocation, body: Any) -> Stream[TalkerChunk]:
        """Talker responses always stream."""
        raise TaskExecutionError("TalkerTask responses are streamed; a non-streamed response was received")
