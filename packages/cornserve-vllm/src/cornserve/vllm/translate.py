"""Rewrite a chat request's media parts into vLLM's precomputed-embedding content parts.

vLLM's OpenAI server (started with `--enable-mm-embeds`) takes an image's embedding as a content
part `{"type": "image_embeds", "image_embeds": B64}`, where B64 is base64 of `torch.save` of a
`[num_tokens, hidden]` tensor; models whose positions depend on the patch grid (the Qwen2-VL
family) take `{"image_embeds": B64, "image_grid_thw": B64}` instead, the grid a `(3,)` tensor.
Audio has `{"type": "audio_embeds", "audio_embeds": B64}`. From 0.13 each part is one item, so a
request carries one part per media item.

What vLLM refuses is refused here first, with a 400 that says why (`EmbeddingTranslationError`):
one request must use one form per modality (vLLM raises `NotImplementedError` on a mix of plain
and grid-carrying parts), video has no embedding part in the supported releases before 0.29 (and
Cornserve does not send `video_embeds`), and a client may not send embedding parts of its own
(vLLM's docs warn that a malformed embedding can crash the engine: only the proxy writes them).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from cornserve.task.builtins.embedding import EmbeddingMeta

MEDIA_PART_TYPES = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio"}
EMBEDS_PART_TYPES = frozenset({"image_embeds", "audio_embeds", "video_embeds", "prompt_embeds"})
"""Content parts that carry tensors into vLLM: written by the proxy only, refused from clients."""
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EmbeddingTranslationError(ValueError):
    """The request and the embeddings it came with do not fit together (a client error)."""


class ReceivedEmbedding(BaseModel):
    """One media item's embedding as Eric sends it: the tensor and its `EmbeddingMeta` (two chunks)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    tensor: torch.Tensor
    meta: EmbeddingMeta


def tensor_to_base64(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """A tensor as vLLM decodes it: base64 of `torch.save`, in `dtype` (default: its own).

    `torch.save` writes a tensor's whole storage, so a view (one item's rows of a batch's buffer,
    which `.contiguous()` leaves as it is) would carry every other item along: the rows are cloned
    into a storage of their own first.
    """
    out = (
        tensor.detach()
        .to(device="cpu", dtype=dtype or tensor.dtype)
        .clone(memory_format=torch.contiguous_format)
    )
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _form(embedding: ReceivedEmbedding) -> str:
    return "grid-carrying (image_grid_thw)" if embedding.meta.grid_thw is not None else "plain"


def check_embedding(embedding: ReceivedEmbedding) -> None:
    """The tensor is what its metadata says: `[num_tokens, hidden]`, of the stated dtype."""
    meta, tensor = embedding.meta, embedding.tensor
    if tensor.dim() != 2 or tensor.shape[0] != meta.num_tokens:
        raise EmbeddingTranslationError(
            f"embedding of shape {tuple(tensor.shape)} does not match its {meta.num_tokens} tokens"
        )
    if tensor.dtype != TORCH_DTYPES[meta.dtype]:
        raise EmbeddingTranslationError(f"embedding is {tensor.dtype} but its metadata says {meta.dtype}")


def embeds_part(embedding: ReceivedEmbedding, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The `image_embeds` or `audio_embeds` content part of one embedding, its tensor cast to `dtype`."""
    check_embedding(embedding)
    meta = embedding.meta
    if meta.modality == "video":
        raise EmbeddingTranslationError(
            "vLLM takes no precomputed video embeddings before 0.29 and Cornserve does not send its "
            "`video_embeds` parts; run this task without encoder fission, or on CPULLMDescriptor"
        )
    data = tensor_to_base64(embedding.tensor, dtype)
    kind = f"{meta.modality}_embeds"
    if meta.grid_thw is None:
        return {"type": kind, kind: data}
    if meta.modality != "image":
        raise EmbeddingTranslationError(f"a {meta.modality} embedding cannot carry a patch grid")
    grid = tensor_to_base64(torch.tensor(meta.grid_thw, dtype=torch.long))
    return {"type": kind, kind: {"image_embeds": data, "image_grid_thw": grid}}


def check_one_form(embeddings: list[ReceivedEmbedding]) -> None:
    """All embeddings of a modality in one request take the same form (vLLM refuses a mix)."""
    by_modality: dict[str, list[ReceivedEmbedding]] = {}
    for embedding in embeddings:
        by_modality.setdefault(embedding.meta.modality, []).append(embedding)
    for modality, items in by_modality.items():
        forms = {_form(e) for e in items}
        if len(forms) > 1:
            models = sorted({e.meta.model_id or "?" for e in items})
            raise EmbeddingTranslationError(
                f"this request mixes plain and grid-carrying (image_grid_thw) {modality} embeddings "
                f"(from encoder models {', '.join(models)}); vLLM takes one form per request (it raises "
                "NotImplementedError on a mix), so encode all of a request's media with one model family"
            )


def rewrite_request(
    body: dict[str, Any], embeddings: list[ReceivedEmbedding], dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """A copy of `body` with its media parts, in order, replaced by their embeddings (cast to `dtype`).

    `cornserve_embeddings` is dropped: vLLM rejects fields it does not know only in strict mode, but
    the forward ids mean nothing to it.
    """
    check_one_form(embeddings)
    out = {k: v for k, v in body.items() if k != "cornserve_embeddings"}
    remaining = list(embeddings)
    messages = []
    for m_index, message in enumerate(body.get("messages", [])):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for p_index, part in enumerate(content):
            part_type = part.get("type", "") if isinstance(part, dict) else ""
            if part_type in EMBEDS_PART_TYPES:
                raise EmbeddingTranslationError(
                    f"message {m_index} part {p_index} is a {part_type} part: clients send media, and "
                    "embeddings arrive through cornserve_embeddings only"
                )
            kind = MEDIA_PART_TYPES.get(part_type)
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
            parts.append(embeds_part(embedding, dtype))
        messages.append({**message, "content": parts})
    if remaining:
        raise EmbeddingTranslationError(
            f"{len(remaining)} embedding(s) left over: the request has fewer media items"
        )
    out["messages"] = messages
    return out
