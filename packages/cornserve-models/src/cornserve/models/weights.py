"""Read a chosen subset of a checkpoint's safetensors tensors, and nothing else.

Partial loading is the point: an encoder executor must not materialize the language model. With
a sharded checkpoint only the shards that hold wanted tensors are opened; within a shard only the
wanted tensors are read (`safe_open` reads the header, then each tensor on demand).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint directory lacks weights or its index is inconsistent."""


@dataclass
class PartialWeights:
    """The tensors read, under their new names, and which files and checkpoint names were read."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    read_names: list[str] = field(default_factory=list)
    opened_files: list[str] = field(default_factory=list)


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not an object")
        return {str(k): str(v) for k, v in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    raise CheckpointError(f"{model_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}")


def load_partial(model_dir: Path, rename: Callable[[str], str | None]) -> PartialWeights:
    """Read the tensors whose checkpoint name `rename` maps to a new name (None = skip)."""
    wanted: dict[str, dict[str, str]] = {}
    for name, shard in _weight_map(model_dir).items():
        new = rename(name)
        if new is not None:
            wanted.setdefault(shard, {})[name] = new
    out = PartialWeights()
    for shard in sorted(wanted):
        path = model_dir / shard
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: shard {shard} named in the index is missing")
        out.opened_files.append(shard)
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name, new in sorted(wanted[shard].items()):
                if name not in present:
                    raise CheckpointError(f"{path} lacks tensor {name} that the index places there")
                out.tensors[new] = f.get_tensor(name)
                out.read_names.append(name)
    return out
