"""The dtype a checkpoint's language model runs in, which embeddings are cast to before they travel.

An encoder-fission embedding ends up in the LLM's input embeddings, so the LLM casts it to its
own dtype anyway: sending it in that dtype from the start halves the bytes of a bfloat16 model
against float32 and gives the LLM exactly what it would have computed. The LLM executors load a
checkpoint in its saved dtype (transformers' and vLLM's `auto`), which the checkpoint's config
declares (`dtype`, formerly `torch_dtype`, at the top level or on the text config); a config that
declares none falls back to the dtype the saved encoder tensors have, then to float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Dtypes an embedding may travel in (`cornserve.task.builtins.embedding.EmbeddingDType`)."""


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` → `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


def _declared(config: Any) -> torch.dtype | None:
    """The dtype a config declares, if it names one of `WIRE_DTYPES`."""
    for attr in ("dtype", "torch_dtype"):
        value = getattr(config, attr, None)
        if isinstance(value, torch.dtype):
            value = dtype_name(value)
        if isinstance(value, str) and value in WIRE_DTYPES:
            return WIRE_DTYPES[value]
    return None


def checkpoint_llm_dtype(config: Any, saved: Iterable[torch.Tensor] = ()) -> torch.dtype:
    """The language model's dtype: the config's, the text config's, the saved tensors', else float32.

    The order is vLLM's for `--dtype auto` (a composite config's top-level dtype first), and the
    top-level dtype is what `save_pretrained` writes for the model as a whole.

    Saved tensors count only when they all share one of `WIRE_DTYPES` (a mixed or quantized
    checkpoint says nothing reliable about the LLM).
    """
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else None
    for candidate in (config, text_config):
        if candidate is not None and (declared := _declared(candidate)) is not None:
            return declared
    dtypes = {t.dtype for t in saved if t.is_floating_point()}
    if len(dtypes) == 1 and (only := dtypes.pop()) in WIRE_DTYPES.values():
        return only
    return torch.float32
