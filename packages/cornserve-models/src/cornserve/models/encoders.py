"""Encoder towers + projectors, loaded alone, computing exactly what the full model would splice in.

`load_encoder(dir)` reads only the encoder tensors of a checkpoint (see `weights.load_partial`)
into the family's vision module. `preprocess` turns one media item into model inputs with the
checkpoint's own processor; `encode` runs a batch of same-modality items and returns one
embedding per item, equal to the corresponding slice of the full HF model's
`get_image_features` / `get_video_features` for the same inputs:

- Qwen2-VL / Qwen2.5-VL: the visual tower including its patch merger, run on the items'
  concatenated patches with their `grid_thw`; item i's embedding is rows
  `[sum(n_<i), sum(n_<=i))` with `n = t*h*w // spatial_merge_size**2`.
- LLaVA: the CLIP tower's hidden state at `vision_feature_layer` (CLS dropped when
  `vision_feature_select_strategy == "default"`), then the multimodal projector; one row per patch.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModel, AutoProcessor

from cornserve.models.families import FAMILY_MODALITIES, encoder_module_key
from cornserve.models.llm_dtype import checkpoint_llm_dtype
from cornserve.models.media import VideoArray
from cornserve.models.weights import PartialWeights, load_partial

logger = logging.getLogger(__name__)


def _untyped(fn: Any) -> Any:
    """Return an unannotated transformers callable as Any, so typed code may call it."""
    return fn


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no encoder adapter."""


class UnsupportedModalityError(ValueError):
    """The model family cannot encode this modality."""


@dataclass(frozen=True)
class Preprocessed:
    """One media item turned into model inputs (CPU tensors), ready to batch with others."""

    modality: str
    pixels: torch.Tensor
    grid_thw: tuple[int, int, int] | None = None
    second_per_grid_t: float | None = None
    """Qwen2.5-VL videos: seconds per temporal patch, which its M-RoPE temporal positions use."""


@dataclass(frozen=True)
class EncodedItem:
    """One item's embedding `[num_tokens, text_hidden_size]` (float32, CPU) and its patch grid."""

    modality: str
    embedding: torch.Tensor
    grid_thw: tuple[int, int, int] | None
    second_per_grid_t: float | None = None


class EncoderModel(ABC):
    """A family's encoder tower + projector and its preprocessing."""

    family: str
    modalities: tuple[str, ...]

    def __init__(
        self, model_dir: Path, config: Any, processor: Any, module: nn.Module, weights: PartialWeights
    ) -> None:
        self.model_dir = model_dir
        self.config = config
        self.processor = processor
        self.module = module
        self._tokenizer_lock = threading.Lock()
        self.loaded_tensor_names: tuple[str, ...] = tuple(weights.read_names)
        self.opened_files: tuple[str, ...] = tuple(weights.opened_files)
        self.llm_dtype: torch.dtype = checkpoint_llm_dtype(config, weights.tensors.values())
        """The checkpoint's language-model dtype: embeddings are sent in it (see `llm_dtype`)."""

    @property
    def device(self) -> torch.device:
        """Where the encoder runs."""
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's compute dtype."""
        return next(self.module.parameters()).dtype

    @property
    def num_parameters(self) -> int:
        """Parameters materialized (the encoder and projector only)."""
        return sum(p.numel() for p in self.module.parameters())

    @property
    def text_hidden_size(self) -> int:
        """Width of the embeddings: the language model's hidden size."""
        return int(self.config.text_config.hidden_size)

    def check_modality(self, modality: str) -> None:
        """Raise UnsupportedModalityError unless this family encodes `modality`."""
        if modality not in self.modalities:
            raise UnsupportedModalityError(
                f"{self.family} models encode {', '.join(self.modalities)}, not {modality!r}"
            )

    @abstractmethod
    def preprocess(self, media: Image.Image | VideoArray, modality: str) -> Preprocessed:
        """One item through the checkpoint's processor (thread-safe; run it in a pool)."""

    @abstractmethod
    def _forward(self, items: list[Preprocessed]) -> list[torch.Tensor]:
        """The batch through the tower + projector: one embedding per item."""

    @torch.inference_mode()
    def encode(self, items: list[Preprocessed]) -> list[EncodedItem]:
        """Embeddings of a batch of same-modality items, in order, as float32 CPU tensors."""
        if not items:
            return []
        modalities = {item.modality for item in items}
        if len(modalities) != 1:
            raise ValueError(f"a batch must hold one modality, got {sorted(modalities)}")
        embeddings = self._forward(items)
        return [
            EncodedItem(
                item.modality,
                emb.to("cpu", torch.float32).contiguous(),
                item.grid_thw,
                item.second_per_grid_t,
            )
            for item, emb in zip(items, embeddings, strict=True)
        ]


class QwenVLEncoder(EncoderModel):
    """Qwen2-VL / Qwen2.5-VL: the visual tower with its patch merger (images and videos)."""

    modalities = ("image", "video")

    def preprocess(self, media: Image.Image | VideoArray, modality: str) -> Preprocessed:
        """Patches `[n, C*T*P*P]` and their `(t, h, w)` grid."""
        self.check_modality(modality)
        second_per_grid_t: float | None = None
        if modality == "image":
            out = self.processor.image_processor(images=[media], return_tensors="pt")
            pixels, grid = out["pixel_values"], out["image_grid_thw"]
        else:
            # Through the whole processor, as a monolithic run would: Qwen2.5-VL's processor adds
            # `second_per_grid_ts` (from the sampled fps) on top of the video processor's output.
            # The processor also tokenizes, and a fast tokenizer must not be used by two threads at once.
            with self._tokenizer_lock:
                out = self.processor(text=[self.processor.video_token], videos=[media], return_tensors="pt")
            pixels, grid = out["pixel_values_videos"], out["video_grid_thw"]
            seconds = out.get("second_per_grid_ts")
            if seconds is not None:
                second_per_grid_t = float(torch.as_tensor(seconds).reshape(-1)[0])
        t, h, w = (int(x) for x in grid[0].tolist())
        return Preprocessed(modality, pixels, (t, h, w), second_per_grid_t)

    def _forward(self, items: list[Preprocessed]) -> list[torch.Tensor]:
        grids = torch.tensor([item.grid_thw for item in items], dtype=torch.long, device=self.device)
        pixels = torch.cat([item.pixels for item in items]).to(self.device, self.dtype)
        out = self.module(pixels, grid_thw=grids)
        merged: torch.Tensor = out.pooler_output if hasattr(out, "pooler_output") else out
        merge = int(self.config.vision_config.spatial_merge_size)
        sizes = (grids.prod(-1) // merge**2).tolist()
        return list(torch.split(merged, sizes))


class LlavaVisionModule(nn.Module):
    """LLaVA's vision tower and multimodal projector, named as in the full model."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = _untyped(AutoModel.from_config)(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)


class LlavaEncoder(EncoderModel):
    """LLaVA: CLIP/SigLIP-style tower, feature layer + select strategy, then the projector (images)."""

    modalities = ("image",)

    def preprocess(self, media: Image.Image | VideoArray, modality: str) -> Preprocessed:
        """Pixels `[1, C, H, W]` (resized and cropped by the checkpoint's image processor)."""
        self.check_modality(modality)
        out = self.processor.image_processor(images=[media], return_tensors="pt")
        return Preprocessed(modality, out["pixel_values"])

    def _forward(self, items: list[Preprocessed]) -> list[torch.Tensor]:
        module = self.module
        assert isinstance(module, LlavaVisionModule)
        pixels = torch.cat([item.pixels for item in items]).to(self.device, self.dtype)
        out = module.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layer = self.config.vision_feature_layer
        strategy = self.config.vision_feature_select_strategy
        layers = [layer] if isinstance(layer, int) else list(layer)
        pool = [out.hidden_states[i] for i in layers]
        if strategy == "default":
            pool = [hs[:, 1:] for hs in pool]
        selected = pool[0] if len(pool) == 1 else torch.cat(pool, dim=-1)
        features: torch.Tensor = module.multi_modal_projector(selected)
        return list(features)


def _vision_module(config: Any) -> tuple[type[EncoderModel], nn.Module]:
    model_type = str(config.model_type)
    if model_type == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        return QwenVLEncoder, _untyped(Qwen2VisionTransformerPretrainedModel._from_config)(
            config.vision_config
        )
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        return QwenVLEncoder, _untyped(Qwen2_5_VisionTransformerPretrainedModel._from_config)(
            config.vision_config
        )
    if model_type == "llava":
        return LlavaEncoder, LlavaVisionModule(config)
    raise UnsupportedModelError(
        f"no encoder for model_type {model_type!r}; supported: {', '.join(sorted(FAMILY_MODALITIES))}"
    )


def load_encoder(model_dir: Path, *, device: str | torch.device | None = None) -> EncoderModel:
    """The checkpoint's encoder tower + projector only, with its processor, ready to `encode`.

    CPU runs in float32; a GPU keeps the checkpoint's dtype. The language model's tensors are
    never read (their shard is not even opened in a sharded checkpoint).
    """
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    model_type = str(config.model_type)
    if model_type not in FAMILY_MODALITIES:
        raise UnsupportedModelError(
            f"no encoder for model_type {model_type!r}; supported: {', '.join(sorted(FAMILY_MODALITIES))}"
        )
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor = _untyped(AutoProcessor.from_pretrained)(model_dir)
    cls, module = _vision_module(config)
    weights = load_partial(model_dir, lambda name: encoder_module_key(model_type, name))
    result = module.load_state_dict(weights.tensors, strict=True)
    del result
    dtype = torch.float32
    if target.type != "cpu":
        dtypes = {t.dtype for t in weights.tensors.values() if t.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    module = module.to(target, dtype).eval()
    encoder = cls(model_dir, config, processor, module, weights)
    encoder.family = model_type
    logger.info(
        "loaded %s encoder from %s: %d tensors from %s, %d parameters on %s",
        model_type,
        model_dir,
        len(weights.read_names),
        ", ".join(weights.opened_files),
        encoder.num_parameters,
        target,
    )
    return encoder
