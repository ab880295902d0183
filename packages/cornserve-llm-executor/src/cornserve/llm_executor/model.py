"""Loading a checkpoint and what differs between model families.

Supported families (by `config.model_type`): the Qwen2-VL family (`qwen2_vl`, M-RoPE positions
from the media grids; image and video), LLaVA-style vision-tower + projector models (`llava`;
image), and plain text causal LMs. The executor only ever runs the model's own forward; this
module knows which placeholder tokens stand for media and how positions are numbered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from cornserve.models.loading import resolve_model_dir
from cornserve.task.builtins.modality import Modality

logger = logging.getLogger(__name__)

MROPE_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl"})
"""Families whose LLM uses 3-D multimodal rotary positions computed by the model's `get_rope_index`."""

MODALITIES_BY_TYPE: dict[str, frozenset[Modality]] = {
    "qwen2_vl": frozenset({Modality.IMAGE, Modality.VIDEO}),
    "qwen2_5_vl": frozenset({Modality.IMAGE, Modality.VIDEO}),
    "llava": frozenset({Modality.IMAGE}),
}


@dataclass
class LoadedModel:
    """A checkpoint ready to serve: the model, its processor/tokenizer and family facts."""

    model_id: str
    model: Any
    tokenizer: Any
    processor: Any | None
    max_model_len: int
    eos_token_ids: frozenset[int]
    placeholder_ids: dict[Modality, int] = field(default_factory=dict)
    placeholder_tokens: dict[Modality, str] = field(default_factory=dict)
    spatial_merge_size: int = 1

    @property
    def model_type(self) -> str:
        """The family (`config.model_type`), as the model's own config says."""
        return str(self.model.config.model_type)

    @property
    def hidden_size(self) -> int:
        """The LLM's hidden size: the width of its token embeddings."""
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (inputs given as embeddings are cast to it)."""
        dtype: torch.dtype = next(self.model.parameters()).dtype
        return dtype

    @property
    def mrope(self) -> bool:
        """Whether positions are Qwen2-VL-style M-RoPE (3 rows plus the text row)."""
        return self.model_type in MROPE_MODEL_TYPES

    @property
    def modalities(self) -> frozenset[Modality]:
        """Media modalities this family's processor and LLM understand."""
        return MODALITIES_BY_TYPE.get(self.model_type, frozenset())

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (inputs are moved there before each forward)."""
        device: torch.device = next(self.model.parameters()).device
        return device

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The LLM's token embeddings for `input_ids` (`[1, L]` → `[1, L, H]`)."""
        embeds: torch.Tensor = self.model.get_input_embeddings()(input_ids)
        return embeds


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    eos: Any = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    if isinstance(eos, int):
        return frozenset({eos})
    return frozenset(int(e) for e in eos)


def load_model(model_id: str, max_model_len: int | None = None, device: str = "cpu") -> LoadedModel:
    """Load the checkpoint (local directory or Hub id) in its saved dtype onto ``device``."""
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: no CUDA device is visible to this process")
    path = str(resolve_model_dir(model_id))
    config = AutoConfig.from_pretrained(path)
    model_type = str(config.model_type)
    multimodal = getattr(config, "vision_config", None) is not None
    model: Any
    processor: Any | None = None
    if multimodal:
        model = AutoModelForImageTextToText.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    if target.type != "cpu":
        model.to(target)
    text_config = config.get_text_config()
    limit = int(getattr(text_config, "max_position_embeddings", 0) or 0) or 1 << 30
    if max_model_len is not None:
        limit = min(limit, max_model_len)
    loaded = LoadedModel(
        model_id=model_id,
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        max_model_len=limit,
        eos_token_ids=_eos_ids(model, tokenizer),
    )
    if processor is not None:
        for modality, attr in ((Modality.IMAGE, "image_token"), (Modality.VIDEO, "video_token")):
            token = getattr(processor, attr, None)
            if modality in loaded.modalities and isinstance(token, str):
                loaded.placeholder_tokens[modality] = token
                loaded.placeholder_ids[modality] = int(tokenizer.convert_tokens_to_ids(token))
        vision = getattr(config, "vision_config", None)
        loaded.spatial_merge_size = int(getattr(vision, "spatial_merge_size", 1) or 1)
    logger.info(
        "loaded %s (%s, dtype %s, on %s, context %d, modalities %s)",
        model_id,
        model_type,
        next(model.parameters()).dtype,
        loaded.device,
        limit,
        sorted(m.value for m in loaded.modalities),
    )
    return loaded
