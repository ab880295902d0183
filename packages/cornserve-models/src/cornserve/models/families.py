"""What Cornserve knows about each supported model family's checkpoint layout.

The encoder executor loads only the tensors under a family's encoder prefixes; the tiny
checkpoint builder puts exactly those tensors in their own shard.
"""

from __future__ import annotations

ENCODER_KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    # (checkpoint prefix, prefix in Cornserve's encoder module): transformers v5 names first, then
    # the names older checkpoints on the Hub use.
    "qwen2_vl": (("model.visual.", ""), ("visual.", "")),
    "qwen2_5_vl": (("model.visual.", ""), ("visual.", "")),
    "llava": (
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "multi_modal_projector."),
    ),
}
"""How checkpoint tensor names of the encoder tower + projector map to the encoder module, by `model_type`."""

ENCODER_PREFIXES: dict[str, tuple[str, ...]] = {
    model_type: tuple(prefix for prefix, _ in pairs) for model_type, pairs in ENCODER_KEY_MAP.items()
}
"""Checkpoint tensor-name prefixes of the encoder tower + projector, by `config.model_type`."""

FAMILY_MODALITIES: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("image", "video"),
    "qwen2_5_vl": ("image", "video"),
    "llava": ("image",),
}
"""Media modalities each family's encoder accepts."""


def encoder_module_key(model_type: str, checkpoint_key: str) -> str | None:
    """The encoder-module name of a checkpoint tensor, or None if it is not part of the encoder."""
    for prefix, target in ENCODER_KEY_MAP[model_type]:
        if checkpoint_key.startswith(prefix):
            return target + checkpoint_key[len(prefix) :]
    return None
