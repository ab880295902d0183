"""ThinkerTask / TalkerTask: the recorded graph, serialization, launch specs and the executor wire forms."""

from __future__ import annotations

import json

import pytest
from pydantic import TypeAdapter, ValidationError

from cornserve.task import (
    DataForward,
    Stream,
    Task,
    TaskDefinitionError,
    TaskExecutionError,
    TaskInvocation,
    Tensor,
    deserialize_task,
    discover_unit_tasks,
    serialize_task,
    wire_forwards,
)
from cornserve.task.builtins import (
    ChatCompletionRequest,
    CPUTalkerDescriptor,
    CPUThinkerDescriptor,
    EmbedsGenerationRequest,
    HiddenStatesTarget,
    TalkerChunk,
    TalkerInput,
    TalkerTask,
    ThinkerOutput,
    ThinkerTalkerTask,
    ThinkerTask,
    VLLMDescriptor,
)
from cornserve.task.builtins.thinker_talker import GENERATE_FROM_EMBEDS_PATH, HIDDEN_STATES_FIELD
from cornserve.task.descriptor import Device, ExecutorPlacement


class ThinkAndTalk(Task[ChatCompletionRequest, Stream[TalkerChunk]]):
    """The pair as a composite: the talker's stream is the result."""

    thinker_model: str
    talker_model: str

    def post_init(self) -> None:
        self.thinker = ThinkerTask(model_id=self.thinker_model, tokens_per_chunk=2)
        self.talker = TalkerTask(model_id=self.talker_model)

    def invoke(self, task_input: ChatCompletionRequest) -> Stream[TalkerChunk]:
        thought = self.thinker.invoke(task_input)
        return self.talker.invoke(TalkerInput(hidden_states=thought.hidden_states, max_tokens=8))


def _request() -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "Say hello."}])


def _placement(port: int, ranks: list[int]) -> ExecutorPlacement:
    return ExecutorPlacement(
        executor_id=f"ex-{port}",
        port=port,
        devices=[Device(kind="cpu", index=ranks[0])],
        sidecar_ranks=ranks,
        nats_url="nats://127.0.0.1:4222",
    )


def test_the_hidden_states_are_one_stream_forward_from_thinker_to_talker() -> None:
    graph = ThinkAndTalk(thinker_model="/m/thinker", talker_model="/m/talker").trace(_request())
    thinker, talker = graph.invocations
    assert isinstance(thinker.task_output, ThinkerOutput)
    forward = thinker.task_output.hidden_states
    assert forward.data_type == "Stream[Tensor]"
    assert isinstance(talker.task_input, TalkerInput) and talker.task_input.hidden_states is forward
    assert graph.edges == [(0, 1, forward.id)]
    assert isinstance(talker.task_output, Stream)


def test_the_built_in_composite_records_the_same_graph() -> None:
    pair = ThinkerTalkerTask(thinker_model_id="/m/thinker", talker_model_id="/m/talker", talker_max_tokens=5)
    graph = pair.trace(_request())
    assert [type(inv.task) for inv in graph.invocations] == [ThinkerTask, TalkerTask]
    assert graph.invocations[1].task_input.max_tokens == 5  # type: ignore[union-attr]
    assert graph.invocations[0].task_input.model == "/m/thinker"  # type: ignore[union-attr]
    assert len(graph.edges) == 1
    assert {t.deployment_key for t in discover_unit_tasks([pair])} == {
        ThinkerTask(model_id="/m/thinker").deployment_key,
        TalkerTask(model_id="/m/talker").deployment_key,
    }


def test_tasks_round_trip_and_keep_their_descriptors() -> None:
    for task in (ThinkerTask(model_id="/m/a", tokens_per_chunk=4), TalkerTask(model_id="/m/b")):
        again = deserialize_task(json.loads(json.dumps(serialize_task(task))))
        assert again == task and again.deployment_key == task.deployment_key
    assert isinstance(ThinkerTask(model_id="/m").descriptor, CPUThinkerDescriptor)
    assert isinstance(TalkerTask(model_id="/m").descriptor, CPUTalkerDescriptor)
    assert ThinkerTask(model_id="/m").deployment_key != TalkerTask(model_id="/m").deployment_key


def test_vllm_cannot_run_either_role() -> None:
    """vLLM's descriptor executes LLMTask only: giving it to a thinker or talker is refused at definition."""
    with pytest.raises((TaskDefinitionError, ValidationError), match="executes LLMTask"):
        ThinkerTask(model_id="/m", descriptor=VLLMDescriptor())
    with pytest.raises((TaskDefinitionError, ValidationError), match="executes LLMTask"):
        TalkerTask(model_id="/m", descriptor=VLLMDescriptor())


def test_launch_specs_name_the_role_flags() -> None:
    thinker = ThinkerTask(model_id="/m/thinker", receive_embeddings=True)
    command = thinker.descriptor.launch_spec(thinker, _placement(8100, [3])).command
    assert command[1:3] == ["-m", "cornserve.llm_executor"]
    assert "--forward-hidden-states" in command and "--receive-embeddings" in command
    assert command[command.index("--sidecar-ranks") + 1] == "3"
    talker = TalkerTask(model_id="/m/talker")
    spec = talker.descriptor.launch_spec(talker, _placement(8101, [4]))
    assert "--receive-input-embeds" in spec.command and "--forward-hidden-states" not in spec.command
    assert spec.env["CORNSERVE_NATS_URL"] == "nats://127.0.0.1:4222"


def test_requests_carry_the_wired_forward() -> None:
    graph = ThinkAndTalk(thinker_model="/m/thinker", talker_model="/m/talker").trace(_request())
    wire_forwards(graph.invocations, [[7], [9]])
    thinker, talker = graph.invocations
    req = thinker.task.descriptor.to_request(thinker.task, thinker)
    assert req.path == "/v1/chat/completions" and req.stream is False and req.body["stream"] is False
    target = HiddenStatesTarget.model_validate(req.body[HIDDEN_STATES_FIELD])
    assert target.tokens_per_chunk == 2
    assert target.forward.src_sidecar_ranks == [7] and target.forward.dst_sidecar_ranks == [[9]]
    req = talker.task.descriptor.to_request(talker.task, talker)
    assert req.path == GENERATE_FROM_EMBEDS_PATH and req.stream is True
    body = EmbedsGenerationRequest.model_validate(req.body)
    assert body.input_embeds.id == target.forward.id and body.max_tokens == 8
    # The invocation list still round-trips through JSON with the stream forward inside.
    again = TypeAdapter(list[TaskInvocation]).validate_json(
        TypeAdapter(list[TaskInvocation]).dump_json(graph.invocations)
    )
    assert again[1].task_input.hidden_states.id == target.forward.id  # type: ignore[union-attr]


def test_responses_and_stream_lines_are_parsed() -> None:
    graph = ThinkAndTalk(thinker_model="/m/thinker", talker_model="/m/talker").trace(_request())
    thinker, talker = graph.invocations
    completion = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "/m/thinker",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    out = thinker.task.descriptor.from_response(thinker.task, thinker, completion)
    assert out == thinker.task_output and list(type(out).model_fields) == ["hidden_states"]  # forwards only
    with pytest.raises(TaskExecutionError, match="sidecar gone"):
        thinker.task.descriptor.from_response(thinker.task, thinker, {"error": {"message": "sidecar gone"}})
    parse = talker.task.descriptor.from_stream_line
    chunk = parse(talker.task, talker, 'data: {"index": 0, "token_id": 5, "text": "a", "inputs_received": 1}')
    assert chunk == TalkerChunk(index=0, token_id=5, text="a", inputs_received=1)
    assert parse(talker.task, talker, "data: [DONE]") is None
    assert parse(talker.task, talker, "") is None
    with pytest.raises(TaskExecutionError, match="stream broke"):
        parse(talker.task, talker, 'data: {"error": {"message": "stream broke"}}')


def test_bodies_refuse_unknown_fields_and_bad_values() -> None:
    forward = DataForward[Stream[Tensor]]().model_dump(mode="json")
    with pytest.raises(ValidationError):
        EmbedsGenerationRequest.model_validate({"input_embeds": forward, "max_tokens": 0})
    with pytest.raises(ValidationError):
        EmbedsGenerationRequest.model_validate({"input_embeds": forward, "prompt": "x"})
    with pytest.raises(ValidationError):
        HiddenStatesTarget.model_validate({"forward": forward, "tokens_per_chunk": 0})
