"""The vLLM request path without processes: command lines, version gates, request rewriting.

What vLLM takes was read in its released sources (see cornserve.vllm.version); these tests pin the
requests the proxy builds to that.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch

from cornserve.task.builtins.embedding import EmbeddingMeta
from cornserve.vllm import (
    EmbeddingTranslationError,
    ReceivedEmbedding,
    VLLMServeArgs,
    rewrite_request,
    vllm_serve_command,
)
from cornserve.vllm.command import flag_value, has_flag, llm_dtype_name
from cornserve.vllm.translate import tensor_to_base64
from cornserve.vllm.version import VersionError, VLLMFeatures, detect_version, parse_version


def _load_b64(b64: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True)


def emb(
    rows: int, value: float, grid: list[int] | None = None, dtype: str = "float32", modality: str = "image"
):
    tensor = torch.full((rows, 8), value, dtype=getattr(torch, dtype))
    meta = EmbeddingMeta(modality=modality, num_tokens=rows, grid_thw=grid, dtype=dtype, model_id="m")  # type: ignore[arg-type]
    return ReceivedEmbedding(tensor=tensor, meta=meta)


def test_vllm_serve_command() -> None:
    args = VLLMServeArgs(
        model="Qwen/Qwen2-VL-2B-Instruct", port=9000, tensor_parallel_size=2, max_model_len=4096,
        enable_mm_embeds=True, extra_args=["--enforce-eager"],
    )  # fmt: skip
    command = vllm_serve_command(args)
    assert command[:3] == ["vllm", "serve", "Qwen/Qwen2-VL-2B-Instruct"]
    joined = " ".join(command)
    assert (
        "--port 9000" in joined and "--tensor-parallel-size 2" in joined and "--max-model-len 4096" in joined
    )
    assert "--enable-mm-embeds" in command and command[-1] == "--enforce-eager"
    assert "--limit-mm-per-prompt" not in command  # the tower stays unless the version allows skipping it
    assert "--enable-mm-embeds" not in vllm_serve_command(args.model_copy(update={"enable_mm_embeds": False}))


def test_vision_tower_skipped_only_with_embeddings_and_no_user_limit() -> None:
    args = VLLMServeArgs(model="m", port=9000, enable_mm_embeds=True, skip_vision_tower=True)
    command = vllm_serve_command(args)
    at = command.index("--limit-mm-per-prompt")
    assert json.loads(command[at + 1]) == {"image": 0, "video": 0}
    # Without embeddings there is nothing to skip the tower for.
    assert "--limit-mm-per-prompt" not in vllm_serve_command(
        args.model_copy(update={"enable_mm_embeds": False})
    )
    # The user's own choice (any spelling vLLM's parser takes) wins.
    for extra in (
        ["--limit-mm-per-prompt", '{"image":2}'],
        ["--limit_mm_per_prompt.image=2"],
        ["--language-model-only"],
    ):
        mine = vllm_serve_command(args.model_copy(update={"extra_args": extra}))
        assert mine.count("--limit-mm-per-prompt") == extra.count("--limit-mm-per-prompt"), mine


def test_dtype_flag_parsing() -> None:
    assert llm_dtype_name([]) is None
    assert llm_dtype_name(["--dtype", "auto"]) is None
    assert llm_dtype_name(["--dtype", "half"]) == "float16"
    assert llm_dtype_name(["--enforce-eager", "--dtype=bfloat16"]) == "bfloat16"
    assert llm_dtype_name(["--dtype", "float", "--dtype", "bfloat16"]) == "bfloat16"  # the last wins
    assert flag_value(["--max_model_len", "9"], "--max-model-len") == "9"
    assert has_flag(["--LANGUAGE-MODEL-ONLY"], "--language-model-only")
    assert not has_flag(["--dtype"], "--language-model-only")


def test_version_parsing_and_gates() -> None:
    assert parse_version("0.16.0\n") == (0, 16, 0)
    assert parse_version("INFO something\n0.16.1rc1.dev5+gabc\n") == (0, 16, 1)
    assert parse_version("v0.33") == (0, 33, 0)
    assert parse_version("usage: vllm ...") is None
    old, new = VLLMFeatures((0, 15, 1)), VLLMFeatures((0, 16, 0))
    assert not old.embeds_without_tower and new.embeds_without_tower
    assert not new.video_embeds and VLLMFeatures((0, 29, 0)).video_embeds
    assert old.in_tested_range and VLLMFeatures((0, 33, 0)).in_tested_range
    assert not VLLMFeatures((0, 12, 0)).in_tested_range and not VLLMFeatures((0, 34, 0)).in_tested_range


async def test_detect_version(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text("#!/bin/sh\necho 0.16.0\n")
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\necho no idea\n")
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    for script in (good, silent, slow):
        script.chmod(0o755)
    assert await detect_version(str(good), 10) == (0, 16, 0)
    with pytest.raises(VersionError, match="no version"):
        await detect_version(str(silent), 10)
    with pytest.raises(VersionError, match=r"did not answer within 0\.5s"):
        await detect_version(str(slow), 0.5)
    with pytest.raises(VersionError, match="cannot run"):
        await detect_version(str(tmp_path / "missing"), 10)


def _request(*media: str) -> dict[str, object]:
    parts: list[dict[str, object]] = []
    for kind in media:
        parts.append({"type": kind, kind: {"url": "file:///a"}})
        parts.append({"type": "text", "text": "and"})
    return {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}],
        "cornserve_embeddings": [{"id": str(i)} for i in range(len(media))],
    }


def test_rewrite_request_replaces_media_in_order() -> None:
    a, b = emb(4, 1.0, [1, 4, 4]), emb(2, 2.0, [1, 2, 4])
    out = rewrite_request(_request("image_url", "image_url"), [a, b])
    assert "cornserve_embeddings" not in out
    parts = out["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["image_embeds", "text", "image_embeds", "text"]
    first, second = parts[0]["image_embeds"], parts[2]["image_embeds"]
    assert torch.equal(_load_b64(first["image_embeds"]), a.tensor)
    assert _load_b64(first["image_grid_thw"]).tolist() == [1, 4, 4]
    # One 2-D part per item, as vLLM >= 0.13 takes several parts of one request.
    assert _load_b64(second["image_embeds"]).shape == (2, 8)
    assert _load_b64(second["image_grid_thw"]).tolist() == [1, 2, 4]
    assert out["messages"][0] == {"role": "system", "content": "be brief"}

    plain = rewrite_request(_request("image_url", "image_url"), [emb(4, 1.0), emb(3, 2.0)])
    assert [_load_b64(p["image_embeds"]).shape for p in plain["messages"][1]["content"][::2]] == [
        (4, 8),
        (3, 8),
    ]


def test_rewrite_request_casts_to_the_llm_dtype() -> None:
    bf16 = emb(4, 1.5, [1, 4, 4], dtype="bfloat16")
    kept = rewrite_request(_request("image_url"), [bf16])["messages"][1]["content"][0]["image_embeds"]
    assert _load_b64(kept["image_embeds"]).dtype == torch.bfloat16  # auto: as it travelled
    cast = rewrite_request(_request("image_url"), [bf16], torch.float16)["messages"][1]["content"][0]
    tensor = _load_b64(cast["image_embeds"]["image_embeds"])
    assert tensor.dtype == torch.float16 and torch.equal(tensor, torch.full((4, 8), 1.5, dtype=torch.float16))
    # A tensor whose dtype is not what its metadata says is refused.
    liar = ReceivedEmbedding(
        tensor=torch.ones(4, 8), meta=EmbeddingMeta(modality="image", num_tokens=4, dtype="bfloat16")
    )
    with pytest.raises(EmbeddingTranslationError, match=r"is torch\.float32 but its metadata says bfloat16"):
        rewrite_request(_request("image_url"), [liar])


def test_a_slice_travels_alone() -> None:
    """One item's rows of a batch buffer: only those rows are serialized (`.contiguous()` would keep the view)."""
    batch = torch.arange(1000 * 64, dtype=torch.float32).reshape(1000, 64)
    item = batch[10:14]
    assert (
        item.is_contiguous()
        and item.contiguous().untyped_storage().nbytes() == batch.untyped_storage().nbytes()
    )
    encoded = tensor_to_base64(item)
    decoded = _load_b64(encoded)
    assert torch.equal(decoded, item)
    assert decoded.untyped_storage().nbytes() == 4 * 64 * 4
    assert len(base64.b64decode(encoded)) < 10_000 < batch.untyped_storage().nbytes()


def test_one_form_per_request() -> None:
    with pytest.raises(EmbeddingTranslationError, match="mixes plain and grid-carrying") as info:
        rewrite_request(_request("image_url", "image_url"), [emb(4, 1.0, [1, 4, 4]), emb(2, 2.0)])
    assert "NotImplementedError" in str(info.value)
    # Different modalities are separate: a grid image and a plain audio item are fine.
    out = rewrite_request(
        _request("image_url", "input_audio"), [emb(4, 1.0, [1, 4, 4]), emb(3, 2.0, modality="audio")]
    )
    audio = out["messages"][1]["content"][2]
    assert audio["type"] == "audio_embeds" and _load_b64(audio["audio_embeds"]).shape == (3, 8)


def test_rewrite_request_errors() -> None:
    one = emb(4, 1.0)
    with pytest.raises(EmbeddingTranslationError, match="no embedding is left"):
        rewrite_request(_request("image_url", "image_url"), [one])
    with pytest.raises(EmbeddingTranslationError, match="left over"):
        rewrite_request(_request("image_url"), [one, one])
    with pytest.raises(EmbeddingTranslationError, match="is image media but its embedding is video"):
        rewrite_request(_request("image_url"), [emb(4, 1.0, modality="video")])
    with pytest.raises(EmbeddingTranslationError, match=r"no precomputed video embeddings before 0\.29"):
        rewrite_request(_request("video_url"), [emb(4, 1.0, [2, 4, 4], modality="video")])
    bad = ReceivedEmbedding(tensor=torch.ones(3, 8), meta=EmbeddingMeta(modality="image", num_tokens=4))
    with pytest.raises(EmbeddingTranslationError, match="does not match its 4 tokens"):
        rewrite_request(_request("image_url"), [bad])
    # Embedding parts come from the proxy only: vLLM would run whatever tensor a client wrote.
    smuggled = _request()
    smuggled["messages"][1]["content"] = [
        {"type": "image_embeds", "image_embeds": tensor_to_base64(torch.ones(2, 8))}
    ]  # type: ignore[index]
    with pytest.raises(EmbeddingTranslationError, match="is a image_embeds part"):
        rewrite_request(smuggled, [])
