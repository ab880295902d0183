"""Tiny checkpoints: HF layout, sharding, determinism, and offline loading + generation with Auto classes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.support.terminal import run_in_terminal
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from cornserve.cli.main import main as cli_main
from cornserve.models.families import ENCODER_PREFIXES
from cornserve.models.tiny import (
    ENCODER_SHARD,
    INDEX_FILE,
    LANGUAGE_SHARD,
    TINY_ARCHITECTURES,
    UnknownArchitectureError,
    build_tiny,
)

SPECIAL = {
    "qwen2-vl": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "qwen2.5-vl": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<image>", "<s>", "</s>", "<pad>"],
}  # fmt: skip


def _image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_architectures_cover_both_families() -> None:
    assert {"qwen2-vl", "llava"} <= set(TINY_ARCHITECTURES)


def test_unknown_architecture_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownArchitectureError) as info:
        build_tiny("gpt-17", tmp_path / "x")
    for name in TINY_ARCHITECTURES:
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_layout_and_sharding(arch: str, tiny_dirs: dict[str, Path]) -> None:
    d = tiny_dirs[arch]
    for name in ("config.json", "generation_config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):  # fmt: skip
        assert (d / name).is_file(), name
    config = AutoConfig.from_pretrained(d)
    prefixes = ENCODER_PREFIXES[config.model_type]
    weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
    encoder = {k for k, shard in weight_map.items() if shard == ENCODER_SHARD}
    language = {k for k, shard in weight_map.items() if shard == LANGUAGE_SHARD}
    assert encoder and language and encoder | language == set(weight_map)
    assert all(k.startswith(prefixes) for k in encoder)
    assert not any(k.startswith(prefixes) for k in language)

    processor = AutoProcessor.from_pretrained(d)
    tok = processor.tokenizer
    assert len(tok) == config.text_config.vocab_size
    assert 300 <= len(tok) <= 1000
    for token in SPECIAL[arch]:
        assert tok.convert_tokens_to_ids(token) is not None
        assert tok.convert_tokens_to_ids(token) < len(tok)
    assert tok.convert_tokens_to_ids(processor.image_token) == config.image_token_id


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    again = build_tiny("llava", tmp_path / "a", seed=0)
    other = build_tiny("llava", tmp_path / "b", seed=1)
    for shard in (ENCODER_SHARD, LANGUAGE_SHARD, "tokenizer.json"):
        assert _digest(again / shard) == _digest(tiny_dirs["llava"] / shard)
    assert _digest(other / ENCODER_SHARD) != _digest(again / ENCODER_SHARD)


def test_cli_builds_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "tiny", "qwen2-vl", str(tmp_path / "q"), "--seed", "3"]) == 0
    assert (tmp_path / "q" / INDEX_FILE).is_file()
    assert cli_main(["models", "tiny", "nope", str(tmp_path / "n")]) == 2
    assert "qwen2-vl" in capsys.readouterr().err


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_auto_classes_generate_offline(
    arch: str, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tiny_dirs[arch]
    processor = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(d).eval()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[_image()], return_tensors="pt")
    num_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert 10 <= num_image_tokens <= 100  # tens of tokens for a 64x64 image
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 8
    assert torch.equal(out, again)
    assert isinstance(processor.decode(new), str)


@pytest.mark.slow  # ~12 s (a pseudo-terminal and a whole build)
def test_cli_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    code, text = run_in_terminal(
        [sys.executable, "-m", "cornserve.cli.main", "models", "tiny", "llava", str(tmp_path / "l")],
        dict(os.environ),
        timeout_s=300,
    )
    assert code == 0, text
    assert "building tiny" in text and "✔" in text and "\x1b[" in text, text
    assert "built a tiny llava checkpoint (random weights)" in text
    assert (tmp_path / "l" / INDEX_FILE).is_file()
