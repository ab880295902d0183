"""Resolve a model id to a local Hugging Face-layout directory.

Executors accept either a local directory (used as is) or a Hub id, which is downloaded (or taken
from the local cache) with `huggingface_hub.snapshot_download` where the network allows.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
"""Files an executor needs: configs, weights, tokenizer/processor files, chat templates."""


class ModelNotFoundError(ValueError):
    """The model id is neither a local model directory nor a downloadable Hub id."""


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


def resolve_model_dir(model_id: str) -> Path:
    """The local directory holding `model_id`'s files.

    A local path must be a directory with a `config.json`. Anything else is treated as a Hub id:
    first the local cache, then a download; failures raise ModelNotFoundError saying what to do.
    """
    path = Path(model_id).expanduser()
    if _looks_like_path(model_id):
        if not path.is_dir():
            raise ModelNotFoundError(f"model directory {model_id!r} does not exist")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {model_id!r} has no config.json; expected a Hugging Face-layout checkpoint "
                "(build one with `cornserve models tiny ARCH DIR`)"
            )
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ModelNotFoundError(
            f"{model_id!r} is not a local directory and huggingface_hub is missing"
        ) from exc
    try:
        return Path(snapshot_download(model_id, allow_patterns=SNAPSHOT_PATTERNS, local_files_only=True))
    except Exception:  # not cached (the error type varies): fall through to a download
        logger.info("model %s is not in the local cache; downloading", model_id)
    try:
        return Path(snapshot_download(model_id, allow_patterns=SNAPSHOT_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many unrelated types for "cannot download"
        raise ModelNotFoundError(
            f"model {model_id!r} is not a local directory and could not be downloaded from the Hub "
            f"({type(exc).__name__}: {exc}). Pass a local checkpoint directory, or build a tiny one with "
            "`cornserve models tiny ARCH DIR`."
        ) from exc
