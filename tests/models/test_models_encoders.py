"""Encoder-only loading: only encoder tensors are read, and embeddings equal the full model's features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from cornserve.models.encoders import UnsupportedModalityError, load_encoder
from cornserve.models.families import ENCODER_PREFIXES
from cornserve.models.tiny import ENCODER_SHARD, INDEX_FILE, TINY_ARCHITECTURES


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(64, 64), (48, 80), (100, 40)]
    ]


def _full(d: Path) -> tuple[Any, Any]:
    return AutoProcessor.from_pretrained(d), AutoModelForImageTextToText.from_pretrained(d).eval()


def _prompt(processor: Any, kind: str, n: int) -> str:
    content = [{"type": kind} for _ in range(n)] + [{"type": "text", "text": "Describe."}]
    return str(
        processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    )


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_only_encoder_tensors_are_read(arch: str, tiny_dirs: dict[str, Path]) -> None:
    d = tiny_dirs[arch]
    encoder = load_encoder(d, device="cpu")
    weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
    assert encoder.opened_files == (ENCODER_SHARD,)
    assert set(encoder.loaded_tensor_names) == {k for k, v in weight_map.items() if v == ENCODER_SHARD}
    assert all(k.startswith(ENCODER_PREFIXES[encoder.family]) for k in encoder.loaded_tensor_names)
    _, full = _full(d)
    assert encoder.num_parameters < full.num_parameters() // 2
    assert encoder.num_parameters == sum(
        p.numel() for n, p in full.named_parameters() if n.startswith(ENCODER_PREFIXES[encoder.family])
    )


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_image_embeddings_equal_full_model(arch: str, tiny_dirs: dict[str, Path]) -> None:
    d = tiny_dirs[arch]
    encoder = load_encoder(d, device="cpu")
    processor, full = _full(d)
    images = _images()
    inputs = processor(text=[_prompt(processor, "image", len(images))], images=images, return_tensors="pt")
    with torch.no_grad():
        kwargs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
        expected = full.get_image_features(**kwargs).pooler_output
    got = encoder.encode([encoder.preprocess(img, "image") for img in images])
    placeholders = int((inputs["input_ids"] == full.config.image_token_id).sum())
    assert placeholders == sum(item.embedding.shape[0] for item in got)
    for item, ref in zip(got, expected, strict=True):
        assert item.embedding.dtype == torch.float32
        assert item.embedding.shape == (ref.shape[0], full.config.text_config.hidden_size)
        assert torch.equal(item.embedding, ref)  # same batch as the full model: bit-identical


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl"])
def test_video_embeddings_equal_full_model(arch: str, tiny_dirs: dict[str, Path]) -> None:
    d = tiny_dirs[arch]
    encoder = load_encoder(d, device="cpu")
    processor, full = _full(d)
    video = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    inputs = processor(text=[_prompt(processor, "video", 1)], videos=[video], return_tensors="pt")
    with torch.no_grad():
        [expected] = full.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"]
        ).pooler_output
    [got] = encoder.encode([encoder.preprocess(video, "video")])
    assert torch.equal(got.embedding, expected)
    assert list(got.grid_thw or ()) == inputs["video_grid_thw"][0].tolist()
    if "second_per_grid_ts" in inputs:
        assert got.second_per_grid_t == pytest.approx(float(inputs["second_per_grid_ts"][0]))
    else:
        assert got.second_per_grid_t is None


def test_llava_refuses_video(tiny_dirs: dict[str, Path]) -> None:
    encoder = load_encoder(tiny_dirs["llava"], device="cpu")
    with pytest.raises(UnsupportedModalityError, match="image"):
        encoder.preprocess(np.zeros((2, 32, 32, 3), dtype=np.uint8), "video")
