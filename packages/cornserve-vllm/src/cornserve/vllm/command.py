"""The `vllm serve` command line for an LLMTask."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cornserve.task.builtins.llm import vllm_serve_flags


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
    extra_args: list[str] = Field(default_factory=list)


def vllm_serve_command(args: VLLMServeArgs, executable: str = "vllm") -> list[str]:
    """`vllm serve MODEL ...`; `--enable-mm-embeds` when embeddings arrive instead of media."""
    command = [executable, "serve", args.model]
    command += vllm_serve_flags(
        args.host, args.port, args.tensor_parallel_size, args.gpu_memory_utilization, args.max_model_len
    )
    if args.enable_mm_embeds:
        command.append("--enable-mm-embeds")
    return command + list(args.extra_args)
