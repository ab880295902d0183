"""`cornserve models tiny ARCH DIR`: small Hugging Face-layout checkpoints with seeded random weights.

Tests and the demo need real model directories without downloads. Each builder writes what a Hub
checkpoint holds — `config.json`, sharded safetensors with `model.safetensors.index.json`
(encoder tower + projector in one shard, the language model in the other, so that partial loading
is exercised for real), `generation_config.json`, a locally trained tokenizer with the family's
special tokens and chat template, and the processor configs — loadable offline by
`AutoProcessor.from_pretrained(dir)` and `AutoModelForImageTextToText.from_pretrained(dir)`.
The text-only thinker and talker (`TINY_TEXT_ARCHITECTURES`) are one `model.safetensors` with the
tokenizer, loadable by `AutoTokenizer` and `AutoModelForCausalLM`.

Same architecture and seed give byte-identical weight files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from cornserve.models.families import ENCODER_PREFIXES
from cornserve.models.tokenizer import train_byte_level_bpe

logger = logging.getLogger(__name__)

LEARNED_VOCAB = 320
"""Byte-level BPE tokens learned from the corpus (256 byte tokens + merges)."""

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
"""The one weight file of the text-only checkpoints (no encoder to shard off)."""
ENCODER_SHARD = "model-00001-of-00002.safetensors"
LANGUAGE_SHARD = "model-00002-of-00002.safetensors"

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_MEDIA_TOKEN_FIELDS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}
"""Which special token each of the Qwen2-VL config's media token ids names."""
LLAVA_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<image>"]

# Qwen2-VL's chat template, in the family's own format (system prompt, <|im_start|>role ... <|im_end|>,
# each image as <|vision_start|><|image_pad|><|vision_end|>).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5's chat template style: "USER: <image>\n... ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _untyped(cls: Any) -> Any:
    """Return an unannotated transformers constructor as Any, so typed code may call it."""
    return cls


class UnknownArchitectureError(ValueError):
    """The requested tiny architecture is not one `build_tiny` knows."""

    def __init__(self, arch: str) -> None:
        super().__init__(
            f"unknown tiny architecture {arch!r}; known architectures: {', '.join(ALL_TINY_ARCHITECTURES)}"
        )
        self.arch = arch


@dataclass(frozen=True)
class _Built:
    model: PreTrainedModel
    processor: Any
    generation_config: GenerationConfig


def _fast_tokenizer(special: list[str], **roles: str | None) -> PreTrainedTokenizerFast:
    backend = train_byte_level_bpe(LEARNED_VOCAB, special)
    tok: PreTrainedTokenizerFast = _untyped(PreTrainedTokenizerFast)(tokenizer_object=backend, **roles)
    return tok


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    tok = _fast_tokenizer(
        QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tok.model_max_length = 4096
    return tok


def _qwen_processors(patch_size: int, merge_size: int, temporal_patch_size: int) -> dict[str, Any]:
    unit = patch_size * merge_size
    common: dict[str, Any] = {
        "patch_size": patch_size,
        "merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
        "min_pixels": unit * unit * 4,  # at least 2x2 merged tokens
        "max_pixels": unit * unit * 64,  # at most 64 tokens per image (per frame pair for video)
    }
    return {
        "image_processor": Qwen2VLImageProcessor(**common),
        "video_processor": Qwen2VLVideoProcessor(
            **common, fps=2.0, min_frames=2, max_frames=8, cap_pixels_per_frame=True
        ),
    }


def _text_ids(tok: PreTrainedTokenizerFast, *names: str) -> list[int]:
    ids = [tok.convert_tokens_to_ids(n) for n in names]
    return [int(i) for i in ids]  # type: ignore[arg-type]


def _tiny_language_model(tok: PreTrainedTokenizerFast, *, bos: int, eos: int, pad: int) -> dict[str, Any]:
    """The language model every family gets: 2 layers, hidden 64, 4 heads (2 KV heads), 4096 positions."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "initializer_range": 0.1,
    }


def _build_qwen2_vl(seed: int, *, v2_5: bool) -> _Built:
    tok = _qwen_tokenizer()
    eot, im_end = _text_ids(tok, "<|endoftext|>", "<|im_end|>")
    media_token_ids = dict(
        zip(QWEN_MEDIA_TOKEN_FIELDS, _text_ids(tok, *QWEN_MEDIA_TOKEN_FIELDS.values()), strict=True)
    )
    patch, merge, temporal = 8, 2, 2
    text = _tiny_language_model(tok, bos=eot, eos=im_end, pad=eot) | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    }
    vision: dict[str, Any] = {
        "depth": 2,
        "hidden_act": "quick_gelu" if not v2_5 else "silu",
        "num_heads": 4,
        "in_channels": 3,
        "patch_size": patch,
        "spatial_merge_size": merge,
        "temporal_patch_size": temporal,
        "initializer_range": 0.1,
    }
    if v2_5:
        vision |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "window_size": patch * merge * 2,
            "fullatt_block_indexes": [1],
        }
    else:
        vision |= {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
    config_cls: Any = Qwen2_5_VLConfig if v2_5 else Qwen2VLConfig
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **media_token_ids)
    torch.manual_seed(seed)
    model_cls: Any = Qwen2_5_VLForConditionalGeneration if v2_5 else Qwen2VLForConditionalGeneration
    model = model_cls(config)
    processor_cls: Any = Qwen2_5_VLProcessor if v2_5 else Qwen2VLProcessor
    processor = processor_cls(
        tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE, **_qwen_processors(patch, merge, temporal)
    )
    generation = _untyped(GenerationConfig)(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False
    )
    return _Built(model, processor, generation)


def _build_llava(seed: int) -> _Built:
    tok = _fast_tokenizer(
        LLAVA_SPECIAL_TOKENS, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None
    )
    tok.model_max_length = 4096
    bos, eos, pad, image = _text_ids(tok, *LLAVA_SPECIAL_TOKENS)
    image_size, patch = 48, 8
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
        initializer_range=0.1,
        initializer_factor=1.0,
    )
    text = LlamaConfig(**_tiny_language_model(tok, bos=bos, eos=eos, pad=pad))
    num_image_tokens = (image_size // patch) ** 2
    config = _untyped(LlavaConfig)(
        vision_config=vision,
        text_config=text,
        image_token_id=image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=num_image_tokens,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = _untyped(LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    generation = _untyped(GenerationConfig)(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False
    )
    return _Built(model, processor, generation)


def _build_qwen2_text(seed: int, *, talker: bool) -> _Built:
    """A text-only Qwen2 causal LM: the thinker, or the talker that generates from its hidden states.

    Both have hidden size 64, so the talker takes the thinker's last-layer hidden states as input
    embeddings as they are (no projection); the talker records that width as
    `thinker_hidden_size` in its config. The talker is a different network (3 layers, wider MLP,
    its own seed stream), so its tokens are not the thinker's.
    """
    tok = _qwen_tokenizer()
    tok.chat_template = QWEN_CHAT_TEMPLATE
    eot, im_end = _text_ids(tok, "<|endoftext|>", "<|im_end|>")
    fields = _tiny_language_model(tok, bos=eot, eos=im_end, pad=eot)
    if talker:
        fields |= {
            "num_hidden_layers": 3,
            "intermediate_size": 192,
            "thinker_hidden_size": fields["hidden_size"],
        }
    config = _untyped(Qwen2Config)(**fields, tie_word_embeddings=False)
    torch.manual_seed(seed * 2 + (1 if talker else 0))
    model = Qwen2ForCausalLM(config)
    generation = _untyped(GenerationConfig)(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False
    )
    return _Built(model, tok, generation)


_BUILDERS: dict[str, Callable[[int], _Built]] = {
    "qwen2-vl": lambda seed: _build_qwen2_vl(seed, v2_5=False),
    "qwen2.5-vl": lambda seed: _build_qwen2_vl(seed, v2_5=True),
    "llava": _build_llava,
}
_TEXT_BUILDERS: dict[str, Callable[[int], _Built]] = {
    "qwen2-thinker": lambda seed: _build_qwen2_text(seed, talker=False),
    "qwen2-talker": lambda seed: _build_qwen2_text(seed, talker=True),
}

TINY_ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)
"""The multimodal architecture names `build_tiny` accepts (encoder tower + LLM, sharded)."""
TINY_TEXT_ARCHITECTURES: tuple[str, ...] = tuple(_TEXT_BUILDERS)
"""The text-only ones: a thinker LLM and a talker that generates from its hidden states."""
ALL_TINY_ARCHITECTURES: tuple[str, ...] = TINY_ARCHITECTURES + TINY_TEXT_ARCHITECTURES
"""Every name `build_tiny` accepts."""


def _write_sharded(model: PreTrainedModel, out_dir: Path) -> None:
    """Encoder tower + projector in shard 1, everything else (the language model) in shard 2."""
    prefixes = ENCODER_PREFIXES[str(model.config.model_type)]
    encoder: dict[str, torch.Tensor] = {}
    language: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        target = encoder if name.startswith(prefixes) else language
        target[name] = tensor.detach().to(torch.float32).contiguous().clone()
    if not encoder or not language:
        raise RuntimeError(
            f"sharding {model.config.model_type}: encoder prefixes {prefixes} matched "
            f"{len(encoder)} tensors, the language model {len(language)}"
        )
    metadata = {"format": "pt"}
    save_file(encoder, str(out_dir / ENCODER_SHARD), metadata=metadata)
    save_file(language, str(out_dir / LANGUAGE_SHARD), metadata=metadata)
    total = sum(t.numel() * t.element_size() for t in [*encoder.values(), *language.values()])
    weight_map = {name: ENCODER_SHARD for name in encoder} | {name: LANGUAGE_SHARD for name in language}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_single(model: PreTrainedModel, out_dir: Path) -> None:
    """A text-only model: every tensor in one `model.safetensors`."""
    tensors = {
        name: tensor.detach().to(torch.float32).contiguous().clone()
        for name, tensor in model.state_dict().items()
    }
    save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})


BUILD_STEPS = ("model", "config", "weights", "processor")
"""The steps `build_tiny` reports to its `on_step` callback, in order (a progress bar's units)."""


def build_tiny(
    arch: str, out_dir: Path, *, seed: int = 0, on_step: Callable[[str], None] | None = None
) -> Path:
    """Write a tiny `arch` checkpoint with weights drawn from `seed` into `out_dir`; return the dir.

    `on_step` is called with each of BUILD_STEPS as it starts (the CLI's progress bar).
    Raises UnknownArchitectureError for names outside ALL_TINY_ARCHITECTURES.
    """
    text_only = arch in _TEXT_BUILDERS
    builder = _TEXT_BUILDERS.get(arch) or _BUILDERS.get(arch)
    if builder is None:
        raise UnknownArchitectureError(arch)
    step = on_step or (lambda _name: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step("model")
    built = builder(seed)
    step("config")
    built.model.config.save_pretrained(out_dir)
    built.generation_config.save_pretrained(out_dir)
    step("weights")
    if text_only:
        _write_single(built.model, out_dir)
    else:
        _write_sharded(built.model, out_dir)
    step("processor")
    built.processor.save_pretrained(out_dir)
    logger.info("built tiny %s checkpoint (seed %d) in %s", arch, seed, out_dir)
    return out_dir
