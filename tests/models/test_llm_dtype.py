"""The dtype embeddings travel in: the checkpoint's language-model dtype (cornserve.models.llm_dtype)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from cornserve.models.llm_dtype import checkpoint_llm_dtype, dtype_name


class WithText(SimpleNamespace):
    def get_text_config(self) -> SimpleNamespace:
        return self.text  # type: ignore[no-any-return]


def test_the_config_then_the_text_config_then_the_saved_tensors() -> None:
    """vLLM's order for `--dtype auto`: a composite config's top-level dtype first."""
    bf16 = [torch.zeros(2, dtype=torch.bfloat16)]
    half_text = SimpleNamespace(dtype="float16")
    assert checkpoint_llm_dtype(WithText(text=half_text, dtype="bfloat16")) == torch.bfloat16
    assert checkpoint_llm_dtype(WithText(text=half_text, dtype=None)) == torch.float16
    assert (
        checkpoint_llm_dtype(WithText(text=SimpleNamespace(dtype=None), dtype=torch.bfloat16))
        == torch.bfloat16
    )
    assert checkpoint_llm_dtype(SimpleNamespace(torch_dtype="bfloat16")) == torch.bfloat16  # older configs
    assert checkpoint_llm_dtype(SimpleNamespace(), bf16) == torch.bfloat16
    # Nothing reliable: mixed or unusual saved dtypes, or nothing at all, give float32.
    assert checkpoint_llm_dtype(SimpleNamespace(), [*bf16, torch.zeros(2)]) == torch.float32
    assert (
        checkpoint_llm_dtype(SimpleNamespace(dtype="int8"), [torch.zeros(2, dtype=torch.float64)])
        == torch.float32
    )
    assert dtype_name(torch.bfloat16) == "bfloat16"


def test_a_tiny_checkpoint_sends_what_its_llm_loads(tiny_dirs: dict[str, Path]) -> None:
    """A bfloat16 copy of a tiny checkpoint: the encoder computes in float32 on CPU, embeddings go as bfloat16."""
    from transformers import AutoModelForImageTextToText

    from cornserve.models.encoders import load_encoder

    assert load_encoder(tiny_dirs["qwen2-vl"], device="cpu").llm_dtype == torch.float32
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs["qwen2-vl"])
    half = tiny_dirs["qwen2-vl"].parent / "qwen2-vl-bf16"
    model.to(torch.bfloat16).save_pretrained(half)
    for extra in tiny_dirs["qwen2-vl"].iterdir():
        if not extra.name.startswith("model") and not (half / extra.name).exists():
            (half / extra.name).write_bytes(extra.read_bytes())
    encoder = load_encoder(half, device="cpu")
    assert encoder.dtype == torch.float32 and encoder.llm_dtype == torch.bfloat16
    loaded = AutoModelForImageTextToText.from_pretrained(half)  # what the CPU LLM executor does
    assert loaded.get_input_embeddings().weight.dtype == encoder.llm_dtype
