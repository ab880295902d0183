"""One left-padded KV cache for all sequences in the decode phase, so a decode step is one forward.

Sequences are prefilled one at a time (their media differ) into their own `DynamicCache`; before
their first decode step they join this batch. Row *i* holds its sequence's keys/values
right-aligned: the first `width - length[i]` columns are zero padding that the attention mask
hides, so every row attends to exactly its own tokens (with `-inf` scores on the padding the
softmax weights there are exactly zero). Rows that finish or are cancelled are dropped with an
index-select, and leading columns that have become padding in every remaining row are trimmed, so
the batch never grows past its longest live sequence.

Only plain full-attention `DynamicLayer`s are batched; `supports` tells the engine when a model's
cache has other layer kinds (sliding windows, linear attention) so it decodes those one by one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def supports(cache: DynamicCache) -> bool:
    """Whether `cache` is made of plain full-attention layers this batch knows how to pad and split."""
    return all(type(layer) is DynamicLayer and layer.keys is not None for layer in cache.layers)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, checked to be initialized full-attention `DynamicLayer`s."""
    if not supports(cache):
        raise ValueError("the decode batch holds only initialized full-attention DynamicLayers")
    return [cast(DynamicLayer, layer) for layer in cache.layers]


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """`[B, H, L, D]` → `[B, H, columns + L, D]` with zeros in front."""
    if columns == 0:
        return tensor
    return F.pad(tensor, (0, 0, columns, 0))


class BatchedDecodeCache:
    """A padded batched `DynamicCache` whose rows are keyed by the engine's sequences."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.rows: list[Hashable] = []
        self.lengths: list[int] = []
        """Real (unpadded) tokens per row."""

    @property
    def width(self) -> int:
        """Columns of the padded cache (the longest row's length)."""
        return max(self.lengths, default=0)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def clear(self) -> None:
        """Drop every row (and the memory they hold)."""
        self.cache = None
        self.rows = []
        self.lengths = []

    def add(self, key: Hashable, cache: DynamicCache) -> None:
        """Append a prefilled sequence's single-row cache (taken over: do not use it afterwards)."""
        if key in self.rows:
            raise ValueError(f"sequence {key!r} is already in the decode batch")
        theirs_layers = _layers(cache)
        if theirs_layers and theirs_layers[0].keys is not None and int(theirs_layers[0].keys.shape[0]) != 1:
            raise ValueError("only single-row caches can join the decode batch")
        length = int(cache.get_seq_length())
        if self.cache is None:
            self.cache, self.rows, self.lengths = cache, [key], [length]
            return
        width = self.width
        grow = max(0, length - width)
        for mine, theirs in zip(_layers(self.cache), theirs_layers, strict=True):
            assert mine.keys is not None and mine.values is not None
            assert theirs.keys is not None and theirs.values is not None
            pad = width + grow - length
            mine.keys = torch.cat([_left_pad(mine.keys, grow), _left_pad(theirs.keys, pad)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, grow), _left_pad(theirs.values, pad)], dim=0)
        self.rows.append(key)
        self.lengths.append(length)

    def retain(self, keys: Sequence[Hashable]) -> None:
        """Keep only the rows of `keys` (in their current order); trim all-padding leading columns."""
        wanted = set(keys)
        keep = [i for i, key in enumerate(self.rows) if key in wanted]
        if len(keep) == len(self.rows):
            return
        if not keep or self.cache is None:
            self.clear()
            return
        old_width = self.width
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        trim = old_width - self.width
        for layer in _layers(self.cache):
            assert layer.keys is not None and layer.values is not None
            index = torch.tensor(keep, dtype=torch.long, device=layer.keys.device)
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:, :]
            layer.values = layer.values.index_select(0, index)[:, :, trim:, :]

    def attention_mask(self) -> torch.Tensor:
        """`[B, width + 1]` mask for a one-token decode step: 0 on each row's padding, 1 elsewhere."""
        width = self.width
        mask = torch.ones((len(self.rows), width + 1), dtype=torch.long)
        for i, length in enumerate(self.lengths):
            mask[i, : width - length] = 0
        return mask

    def advanced(self) -> None:
        """Record that a decode forward appended one token to every row."""
        self.lengths = [length + 1 for length in self.lengths]
        if self.cache is not None and int(self.cache.get_seq_length()) != self.width:
            raise RuntimeError(
                f"decode batch out of step: cache holds {self.cache.get_seq_length()} columns, "
                f"rows expect {self.width}"
            )
