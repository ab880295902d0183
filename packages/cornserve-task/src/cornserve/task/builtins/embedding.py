"""The embedding hand-off: how an encoder's output travels to an LLM executor (docs/executors.md).

An `EncoderTask` output forward carries two sidecar chunks per media item:
chunk `EMBEDDING_TENSOR_CHUNK` (0) is the `[num_tokens, hidden]` tensor in the LLM's dtype (the
checkpoint's: half the bytes of float32 for a bfloat16 model, and what the LLM casts to anyway),
and chunk `EMBEDDING_META_CHUNK` (1) is `EmbeddingMeta` as a plain dict (`model_dump(mode="json")`)
naming that dtype. Eric sends it; the CPU LLM executor and the vLLM proxy receive it. This module
is the one definition all three use (torch-free: dtypes are their names).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from cornserve.task.builtins.modality import Modality

EMBEDDING_TENSOR_CHUNK = 0
"""Chunk id of the embedding tensor within an embedding forward."""
EMBEDDING_META_CHUNK = 1
"""Chunk id of the `EmbeddingMeta` dict within an embedding forward."""
EMBEDDING_NUM_CHUNKS = 2
"""An embedding forward has exactly these two chunks."""

EmbeddingDType = Literal["float32", "bfloat16", "float16"]
"""The dtypes an embedding tensor travels in, by torch's name (`str(torch.bfloat16)` less `torch.`)."""


class EmbeddingMeta(BaseModel):
    """What a consumer needs to know about one media item's embedding tensor (chunk 1)."""

    modality: Modality
    num_tokens: int = Field(ge=1)
    """Rows of the tensor in chunk 0: the media item's placeholder tokens in the prompt."""
    grid_thw: list[int] | None = None
    """Qwen-VL family: the (t, h, w) patch grid the positions depend on; null otherwise."""
    model_id: str = ""
    """The encoder's model, so a consumer can refuse embeddings of another model."""
    second_per_grid_t: float | None = None
    """Qwen2.5-VL videos: seconds per temporal patch (its M-RoPE time spacing); null otherwise."""
    dtype: EmbeddingDType = "float32"
    """The dtype of the tensor in chunk 0: the LLM's, which the sender cast to. A receiver refuses a
    tensor of another dtype (the two chunks disagree). Absent (older senders): float32."""
