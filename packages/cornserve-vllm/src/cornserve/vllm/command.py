"""The `vllm serve` command line for an LLMTask."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from cornserve.task.builtins.llm import vllm_serve_flags

NO_MEDIA_LIMITS = {"image": 0, "video": 0}
"""`--limit-mm-per-prompt` under encoder fission: no raw media, so vLLM does not load its vision tower
(it skips a tower whose modalities all have a zero limit) while `--enable-mm-embeds` still lets
embeddings through (vLLM 0.16 and later; `version.EMBEDS_WITHOUT_TOWER`)."""
MEDIA_LIMIT_FLAGS = ("--limit-mm-per-prompt", "--language-model-only")
"""Flags by which the user already decides what vLLM loads; Cornserve then adds no limit of its own."""
VLLM_DTYPES = {
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float": "float32",
    "float32": "float32",
}
"""vLLM's `--dtype` values that fix the model's dtype (`auto` follows the checkpoint), by torch name."""


class VLLMServeArgs(BaseModel):
    """What Cornserve decides about a `vllm serve` process; everything else goes in `extra_args`."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(gt=0, lt=65536)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    max_model_len: int | None = Field(default=None, ge=1)
    enable_mm_embeds: bool = False
    skip_vision_tower: bool = False
    """With `enable_mm_embeds`: zero media limits so the vision tower is not loaded (vLLM >= 0.16)."""
    extra_args: list[str] = Field(default_factory=list)


def _flag_name(arg: str) -> str | None:
    """The long option an argument spells as vLLM's parser reads it (`--dtype=half` → `--dtype`)."""
    if not arg.startswith("--"):
        return None
    return "--" + arg[2:].split("=", 1)[0].split(".", 1)[0].replace("_", "-").lower()


def has_flag(args: Sequence[str], *names: str) -> bool:
    """Whether `args` pass any of the long options `names` (in any spelling vLLM accepts)."""
    return any(_flag_name(arg) in names for arg in args)


def flag_value(args: Sequence[str], name: str) -> str | None:
    """The value of the last `name VALUE` or `name=VALUE` in `args`, or None."""
    value: str | None = None
    for index, arg in enumerate(args):
        if _flag_name(arg) != name or "." in arg.split("=", 1)[0]:
            continue
        if "=" in arg:
            value = arg.split("=", 1)[1]
        elif index + 1 < len(args):
            value = args[index + 1]
    return value


def llm_dtype_name(args: Sequence[str]) -> str | None:
    """The dtype `--dtype` fixes for vLLM's model (`"bfloat16"`, ...), or None for `auto` or no flag.

    Embeddings are cast to it before they go to vLLM; with None they keep the dtype they travelled
    in, the checkpoint's, which is what `auto` loads a half-precision checkpoint in.
    """
    value = flag_value(args, "--dtype")
    return None if value is None else VLLM_DTYPES.get(value.lower())


def vllm_serve_command(args: VLLMServeArgs, executable: str = "vllm") -> list[str]:
    """`vllm serve MODEL ...`; `--enable-mm-embeds` (and no media limits) when embeddings arrive instead of media."""
    command = [executable, "serve", args.model]
    command += vllm_serve_flags(
        args.host, args.port, args.tensor_parallel_size, args.gpu_memory_utilization, args.max_model_len
    )
    if args.enable_mm_embeds:
        command.append("--enable-mm-embeds")
        if args.skip_vision_tower and not has_flag(args.extra_args, *MEDIA_LIMIT_FLAGS):
            command += ["--limit-mm-per-prompt", json.dumps(NO_MEDIA_LIMITS, separators=(",", ":"))]
    return command + list(args.extra_args)
