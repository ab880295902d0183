"""Rewrite a chat request's media parts into vLLM `image_embeds` parts.

vLLM's OpenAI server (started with `--enable-mm-embeds`) accepts precomputed embeddings as a
content part `{"type": "image_embeds", "image_embeds": B64}` where B64 is a base64 `torch.save`
of a `[num_tokens, hidden]` tensor; models whose positions depend on the patch grid (the Qwen2-VL
family) take `{"image_embeds": B64, "image_grid_thw": B64}` instead.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from cornserve.task.builtins.embedding import EmbeddingMeta

MEDIA_PART_TYPES = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio"}


class EmbeddingTranslationError(ValueError):
    """The request and the embeddings it came with do not fit together (a client error)."""


class ReceivedEmbedding(BaseModel):
    """One media item's embedding as Eric sends it: the tensor and its `EmbeddingMeta` (two chunks)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    tensor: torch.Tensor
    meta: EmbeddingMeta


def tensor_to_base64(tensor: torch.Tensor) -> str:
    """A tensor as vLLM decodes it: base64 of `torch.save`."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def embeds_part(embedding: ReceivedEmbedding) -> dict[str, Any]:
    """The `image_embeds` content part of one embedding."""
    meta = embedding.meta
    if meta.modality != "image":
        raise EmbeddingTranslationError(
            f"vLLM takes precomputed embeddings for images only; got a {meta.modality} embedding "
            "(run this task without encoder fission, or on CPULLMDescriptor)"
        )
    if embedding.tensor.dim() != 2 or embedding.tensor.shape[0] != meta.num_tokens:
        raise EmbeddingTranslationError(
            f"embedding of shape {tuple(embedding.tensor.shape)} does not match its {meta.num_tokens} tokens"
        )
    data = tensor_to_base64(embedding.tensor)
    if meta.grid_thw is None:
        return {"type": "image_embeds", "image_embeds": data}
    grid = tensor_to_base64(torch.tensor(meta.grid_thw, dtype=torch.long))
    return {"type": "image_embeds", "image_embeds": {"image_embeds": data, "image_grid_thw": grid}}


def rewrite_request(body: dict[str, Any], embeddings: list[ReceivedEmbedding]) -> dict[str, Any]:
    """A copy of `body` with its media parts, in order, replaced by their embeddings.

    `cornserve_embeddings` is dropped: vLLM rejects fields it does not know only in strict mode, but
    the forward ids mean nothing to it.
    """
    out = {k: v for k, v in body.items() if k != "cornserve_embeddings"}
    remaining = list(embeddings)
    messages = []
    for m_index, message in enumerate(body.get("messages", [])):
        content = message.get("content")
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for p_index, part in enumerate(content):
            kind = MEDIA_PART_TYPES.get(part.get("type", "")) if isinstance(part, dict) else None
            if kind is None:
                parts.append(part)
                continue
            if not remaining:
                raise EmbeddingTranslationError(
                    f"message {m_index} part {p_index} is {kind} media but no embedding is left for it "
                    f"({len(embeddings)} embedding(s) for more media items)"
                )
            embedding = remaining.pop(0)
            if embedding.meta.modality != kind:
                raise EmbeddingTranslationError(
                    f"message {m_index} part {p_index} is {kind} media but its embedding is {embedding.meta.modality}"
                )
            parts.append(embeds_part(embedding))
        messages.append({**message, "content": parts})
    if remaining:
        raise EmbeddingTranslationError(
            f"{len(remaining)} embedding(s) left over: the request has fewer media items"
        )
    out["messages"] = messages
    return out
