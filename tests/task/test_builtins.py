"""Built-in tasks: MLLM composition, modalities, descriptors' launch and request translation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from cornserve.task import (
    DataForward,
    Device,
    ExecutorPlacement,
    ExecutorRequest,
    InProcessRunner,
    InvalidTaskInputError,
    LocalForwardStore,
    Stream,
    Task,
    TaskExecutionError,
    TaskOutput,
    Tensor,
    discover_unit_tasks,
    use_graph_runner,
    wire_forwards,
)
from cornserve.task.builtins import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CPULLMDescriptor,
    EncoderInput,
    EncoderTask,
    LLMTask,
    MLLMTask,
    Modality,
    VLLMDescriptor,
)


def chat(*parts: tuple[str, str]) -> ChatCompletionRequest:
    content: list[dict[str, Any]] = []
    for kind, value in parts:
        if kind == "text":
            content.append({"type": "text", "text": value})
        else:
            content.append({"type": f"{kind}_url", f"{kind}_url": {"url": value}})
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": content}], "max_completion_tokens": 8}
    )


MIXED = chat(
    ("image", "file:///a.png"),
    ("text", "and"),
    ("video", "file:///v.mp4"),
    ("image", "data:image/png;base64,AA"),
)


def test_fission_one_encoder_per_modality_and_embeddings_in_media_order() -> None:
    mllm = MLLMTask(model_id="qwen", modalities=[Modality.IMAGE, Modality.VIDEO])
    graph = mllm.trace(MIXED)
    names = [inv.task.display_name() for inv in graph.invocations]
    assert names == ["EncoderTask[image]", "EncoderTask[video]", "LLMTask[embeddings]"]
    image_out, video_out = graph.invocations[0].task_output, graph.invocations[1].task_output
    assert graph.invocations[0].task_input.data_urls == ["file:///a.png", "data:image/png;base64,AA"]
    llm_input = graph.invocations[2].task_input
    expected = [image_out.embeddings[0].id, video_out.embeddings[0].id, image_out.embeddings[1].id]
    assert [f.id for f in llm_input.cornserve_embeddings] == expected
    assert llm_input.model == "qwen"
    assert sorted(graph.edges) == sorted([(0, 2, expected[0]), (1, 2, expected[1]), (0, 2, expected[2])])
    assert isinstance(graph.output, Stream)


def test_fission_text_only_request_skips_encoders() -> None:
    graph = MLLMTask(model_id="qwen").trace(chat(("text", "hello")))
    assert [inv.task.display_name() for inv in graph.invocations] == ["LLMTask[embeddings]"]


def test_without_fission_a_single_llm_encodes_media() -> None:
    mllm = MLLMTask(model_id="qwen", modalities=[Modality.IMAGE, Modality.VIDEO], encoder_fission=False)
    graph = mllm.trace(MIXED)
    assert len(graph.invocations) == 1
    task = graph.invocations[0].task
    assert isinstance(task, LLMTask) and not task.receive_embeddings
    assert task.modalities == [Modality.IMAGE, Modality.VIDEO]
    assert graph.invocations[0].task_input.cornserve_embeddings == []


@pytest.mark.parametrize("fission", [True, False])
def test_undeclared_modality_is_a_clear_error(fission: bool) -> None:
    mllm = MLLMTask(model_id="qwen", modalities=[Modality.IMAGE], encoder_fission=fission)
    with pytest.raises(
        InvalidTaskInputError,
        match=r"video content \(message 0, part 2\) is not accepted: this MLLMTask \(qwen\) declares modalities \[image\]",
    ):
        mllm.trace(MIXED)


def test_input_audio_parts_count_as_audio() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
                }
            ]
        }
    )
    (item,) = request.media()
    assert item.modality == Modality.AUDIO and item.url == "data:audio/wav;base64,AAAA"


def test_encoder_input_checks_url_schemes_and_model() -> None:
    with pytest.raises(
        ValidationError, match=r"data_urls\[1\] 'ftp://x' is not an http\(s\):, data: or file: URL"
    ):
        EncoderInput(model_id="m", data_urls=["https://x/a.png", "ftp://x"])

    class Wrap(Task[EncoderInput, TaskOutput]):
        def post_init(self) -> None:
            self.enc = EncoderTask(modality=Modality.IMAGE, model_id="m")

        def invoke(self, task_input: EncoderInput) -> TaskOutput:
            return self.enc.invoke(task_input)

    with pytest.raises(InvalidTaskInputError, match="does not match this EncoderTask's model 'm'"):
        Wrap().trace(EncoderInput(model_id="other", data_urls=["file:///a.png"]))


def test_chat_request_is_openai_wire_compatible() -> None:
    body = {
        "model": "gpt-x",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "https://e/x.png", "detail": "low"}},
                ],
            },
        ],
        "temperature": 0.2,
        "stream": True,
        "user": "someone",
        "logit_bias": {"1": 2},
    }
    request = ChatCompletionRequest.model_validate(body)
    assert request.openai_body() == body
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})


def placement(devices: list[Device]) -> ExecutorPlacement:
    return ExecutorPlacement(
        executor_id="ex-1",
        host="127.0.0.1",
        port=8123,
        devices=devices,
        sidecar_ranks=[3, 4],
        nats_url="nats://127.0.0.1:4222",
    )


def test_vllm_descriptor_launch_and_translation() -> None:
    descriptor = VLLMDescriptor(tensor_parallel_size=2, max_model_len=2048, extra_args=["--enforce-eager"])
    task = LLMTask(model_id="Qwen/Qwen2-VL-7B-Instruct", receive_embeddings=True, descriptor=descriptor)
    assert descriptor.num_devices(task) == 2
    spec = descriptor.launch_spec(
        task, placement([Device(kind="cuda", index=2), Device(kind="cuda", index=3)])
    )
    # Encoder fission: Cornserve's proxy receives the embeddings and runs `vllm serve` behind it.
    assert spec.command[1:3] == ["-m", "cornserve.vllm"]
    joined = " ".join(spec.command)
    assert "--model-id Qwen/Qwen2-VL-7B-Instruct" in joined and "--sidecar-ranks 3,4" in joined
    assert (
        "--port 8123" in joined and "--tensor-parallel-size 2" in joined and "--max-model-len 2048" in joined
    )
    assert spec.command[-2:] == ["--", "--enforce-eager"]
    # The start deadline is the descriptor's (a first large tensor-parallel start takes long), for
    # the task manager's wait and the proxy's own.
    assert spec.ready_timeout_s == 1800 and "--ready-timeout 1800.0" in joined
    slow = descriptor.model_copy(update={"ready_timeout_s": 3600.0})
    assert (
        slow.launch_spec(
            task, placement([Device(kind="cuda", index=2), Device(kind="cuda", index=3)])
        ).ready_timeout_s
        == 3600
    )
    # Without fission vLLM takes the media itself and is launched directly.
    plain = LLMTask(model_id="Qwen/Qwen2-VL-7B-Instruct", modalities=["image"], descriptor=descriptor)
    direct = descriptor.launch_spec(
        plain, placement([Device(kind="cuda", index=2), Device(kind="cuda", index=3)])
    ).command
    assert direct[:3] == ["vllm", "serve", "Qwen/Qwen2-VL-7B-Instruct"]
    assert "--port 8123" in " ".join(direct) and direct[-1] == "--enforce-eager"
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "2,3" and spec.env["CORNSERVE_SIDECAR_RANKS"] == "3,4"
    with pytest.raises(TaskExecutionError, match="needs GPU devices"):
        descriptor.launch_spec(task, placement([Device(kind="cpu", index=0)]))

    graph = MLLMTask(model_id="Qwen/Qwen2-VL-7B-Instruct", llm_descriptor=descriptor).trace(
        chat(("image", "file:///a.png"), ("text", "hi"))
    )
    wire_forwards(graph.invocations, [[0], [3, 4]])
    llm_inv = graph.invocations[1]
    request = descriptor.to_request(llm_inv.task, llm_inv)
    assert request.path == "/v1/chat/completions" and request.stream
    assert request.body is not None
    assert request.body["stream"] is True and request.body["model"] == "Qwen/Qwen2-VL-7B-Instruct"
    (fwd,) = request.body["cornserve_embeddings"]
    assert fwd["src_sidecar_ranks"] == [0] and fwd["dst_sidecar_ranks"] == [[3, 4]]
    assert "cornserve_embeddings" not in ChatCompletionRequest.model_validate(request.body).openai_body()

    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "q",
        "choices": [{"index": 0, "delta": {"content": "Hi"}}],
    }
    parsed = descriptor.from_stream_line(llm_inv.task, llm_inv, "data: " + json.dumps(chunk))
    assert isinstance(parsed, ChatCompletionChunk) and parsed.choices[0].delta.content == "Hi"
    assert descriptor.from_stream_line(llm_inv.task, llm_inv, "data: [DONE]") is None
    assert descriptor.from_stream_line(llm_inv.task, llm_inv, "") is None
    with pytest.raises(TaskExecutionError, match="out of memory"):
        descriptor.from_stream_line(llm_inv.task, llm_inv, 'data: {"error": {"message": "out of memory"}}')

    # The relay's path: the chunk's JSON as it came (validated once, by the caller), same skips and errors.
    line = "data: " + json.dumps(chunk)
    assert descriptor.stream_item_json(llm_inv.task, llm_inv, line) == json.dumps(chunk).encode()
    for skipped in ("data: [DONE]", "", ": keep-alive", "event: x"):
        assert descriptor.stream_item_json(llm_inv.task, llm_inv, skipped) is None
    with pytest.raises(TaskExecutionError, match="out of memory"):
        descriptor.stream_item_json(llm_inv.task, llm_inv, 'data: {"error": {"message": "out of memory"}}')
    with pytest.raises(TaskExecutionError, match="not a JSON object"):
        descriptor.stream_item_json(llm_inv.task, llm_inv, "data: [1, 2]")
    with pytest.raises(json.JSONDecodeError):
        descriptor.stream_item_json(llm_inv.task, llm_inv, 'data: {"a": 1}], "end": true, "x": [{')


def test_eric_and_cpu_llm_launch_specs() -> None:
    mllm = MLLMTask(model_id="/models/tiny", modalities=[Modality.IMAGE])
    encoder = mllm.encoders[Modality.IMAGE]
    spec = encoder.descriptor.launch_spec(encoder, placement([Device(kind="cpu", index=0)]))
    assert spec.command[1:3] == ["-m", "cornserve.eric"]
    assert (
        "--sidecar-ranks" in spec.command and spec.command[spec.command.index("--sidecar-ranks") + 1] == "3,4"
    )
    assert "CUDA_VISIBLE_DEVICES" not in spec.env
    llm = mllm.llm
    assert isinstance(llm.descriptor, CPULLMDescriptor)
    llm_spec = llm.descriptor.launch_spec(llm, placement([Device(kind="cpu", index=1)]))
    assert (
        llm_spec.command[1:3] == ["-m", "cornserve.llm_executor"]
        and "--receive-embeddings" in llm_spec.command
    )


async def test_mllm_end_to_end_in_process() -> None:
    """Encoders put one embedding per item into the store; the LLM reads them in order and streams."""
    store = LocalForwardStore()

    async def eric(req: ExecutorRequest) -> Any:
        assert req.body is not None and req.path == "/embeddings"
        for item in req.body["items"]:
            assert item["dst_sidecar_ranks"], "forwards are wired to the LLM's rank"
            store.put(item["forward_id"], np.full(4, float(len(item["url"]))))
        return {"forward_ids": [item["forward_id"] for item in req.body["items"]]}

    async def llm(req: ExecutorRequest) -> AsyncIterator[str]:
        assert req.body is not None and req.stream
        forwards = req.body.get("cornserve_embeddings", [])

        async def lines() -> AsyncIterator[str]:
            for i, fwd in enumerate(forwards):
                value = (await store.get(fwd["id"], timeout=5))[0]
                chunk = {
                    "id": "x",
                    "created": 0,
                    "model": req.body["model"],
                    "choices": [{"index": 0, "delta": {"content": f"{i}:{value:g} "}}],
                }  # type: ignore[index]
                yield "data: " + json.dumps(chunk)
            yield "data: [DONE]"

        return lines()

    runner = InProcessRunner({EncoderTask: eric, LLMTask: llm})
    mllm = MLLMTask(model_id="tiny", modalities=[Modality.IMAGE, Modality.VIDEO])
    with use_graph_runner(runner):
        stream = await mllm(MIXED)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    # URL lengths in media order: image a.png (13), video (13), image data URL (24).
    assert text == "0:13 1:13 2:24 "


class Answer(TaskOutput):
    thumbnail: DataForward[Tensor]
    answer: Stream[ChatCompletionChunk]


class ThumbnailAndAnswer(Task[ChatCompletionRequest, Answer]):
    """A composite of an MLLMTask (itself a composite) and another encoder: three levels deep."""

    model_id: str

    def post_init(self) -> None:
        self.thumbnailer = EncoderTask(modality=Modality.IMAGE, model_id="thumbnailer", max_batch_size=1)
        self.mllm = MLLMTask(model_id=self.model_id, modalities=[Modality.IMAGE, Modality.VIDEO])

    def invoke(self, task_input: ChatCompletionRequest) -> Answer:
        first_image = next(m.url for m in task_input.media() if m.modality == Modality.IMAGE)
        thumb = self.thumbnailer.invoke(EncoderInput(model_id="thumbnailer", data_urls=[first_image]))
        return Answer(thumbnail=thumb.embeddings[0], answer=self.mllm.invoke(task_input))


def test_deep_composite_records_in_order_and_discovers_all_unit_tasks() -> None:
    task = ThumbnailAndAnswer(model_id="qwen")
    graph = task.trace(MIXED)
    assert [(inv.task.display_name(), getattr(inv.task, "model_id", None)) for inv in graph.invocations] == [
        ("EncoderTask[image]", "thumbnailer"),
        ("EncoderTask[image]", "qwen"),
        ("EncoderTask[video]", "qwen"),
        ("LLMTask[embeddings]", "qwen"),
    ]
    assert [e[:2] for e in graph.edges] == [(1, 3), (2, 3), (1, 3)]
    assert 'out(["output"])' in graph.to_mermaid() and "t0 -->|Tensor" in graph.to_mermaid()
    keys = {t.deployment_key for t in discover_unit_tasks([task])}
    assert len(keys) == 4


async def test_deep_composite_executes_in_process() -> None:
    store = LocalForwardStore()

    async def eric(req: ExecutorRequest) -> Any:
        assert req.body is not None
        for item in req.body["items"]:
            store.put(item["forward_id"], np.full(2, float(len(item["url"]))))
        return {"forward_ids": [item["forward_id"] for item in req.body["items"]]}

    async def llm(req: ExecutorRequest) -> AsyncIterator[str]:
        assert req.body is not None
        forwards = req.body["cornserve_embeddings"]

        async def lines() -> AsyncIterator[str]:
            values = [float((await store.get(f["id"], timeout=5))[0]) for f in forwards]
            yield "data: " + json.dumps(
                {"id": "x", "created": 0, "model": "qwen", "choices": [{"delta": {"content": repr(values)}}]}
            )

        return lines()

    with use_graph_runner(InProcessRunner({EncoderTask: eric, LLMTask: llm})):
        answer = await ThumbnailAndAnswer(model_id="qwen")(MIXED)
    assert answer.thumbnail.src_sidecar_ranks is not None and answer.thumbnail.dst_sidecar_ranks == []
    chunks = [c async for c in answer.answer]
    assert chunks[0].choices[0].delta.content == "[13.0, 13.0, 24.0]"


def test_llm_completion_task_shares_the_llm_deployment_and_asks_for_one_completion() -> None:
    from pydantic import TypeAdapter

    from cornserve.task import TaskInvocation
    from cornserve.task.builtins import ChatCompletion, LLMCompletionTask, LLMTask

    completion = LLMCompletionTask(model_id="m", receive_embeddings=False)
    assert completion.deployment_key == LLMTask(model_id="m").deployment_key
    assert completion.deployment_key != LLMCompletionTask(model_id="other").deployment_key

    class TwoAnswers(TaskOutput):
        first: ChatCompletion
        second: ChatCompletion

    class Both(Task[ChatCompletionRequest, TwoAnswers]):
        def post_init(self) -> None:
            self.a = LLMCompletionTask(model_id="a")
            self.b = LLMCompletionTask(model_id="b")

        def invoke(self, task_input: ChatCompletionRequest) -> TwoAnswers:
            return TwoAnswers(first=self.a.invoke(task_input), second=self.b.invoke(task_input))

    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stream_options={"x": 1})
    graph = Both().trace(request)
    adapter = TypeAdapter(list[TaskInvocation])
    wire = adapter.validate_json(adapter.dump_json(graph.invocations))
    first = wire[0]
    assert isinstance(first.task, LLMCompletionTask)
    http = first.task.descriptor.to_request(first.task, first)
    assert http.stream is False and http.body is not None
    assert http.body["stream"] is False and "stream_options" not in http.body
    body = {
        "id": "c1",
        "created": 1,
        "model": "a",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
        ],
    }
    answer = first.task.descriptor.from_response(first.task, first, body)
    assert isinstance(answer, ChatCompletion) and answer.choices[0].message.content == "hello"
