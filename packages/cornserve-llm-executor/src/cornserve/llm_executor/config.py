"""Command line of the LLM executor: exactly the flags `CPULLMDescriptor.launch_spec` passes."""

from __future__ import annotations

import argparse
import os

from pydantic import BaseModel, Field

from cornserve.bus.lifecycle import sidecar_ranks_arg


class ExecutorConfig(BaseModel):
    """Everything the executor process is configured with (flags plus environment)."""

    model_id: str = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_batch_size: int = Field(default=8, ge=1)
    decode_batching: bool = True
    sidecar_ranks: list[int] = Field(default_factory=list)
    receive_embeddings: bool = False
    max_model_len: int | None = Field(default=None, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    embedding_timeout_s: float = Field(default=60.0, gt=0)
    media_timeout_s: float = Field(default=30.0, gt=0)
    nats_url: str | None = None
    executor_id: str = "llm-executor"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flags mirror CPULLMDescriptor; the rest are optional tuning knobs)."""
    p = argparse.ArgumentParser(
        prog="python -m cornserve.llm_executor",
        description="Cornserve's CPU LLM executor: an OpenAI-compatible chat server on transformers.",
    )
    p.add_argument("--model-id", required=True, help="local Hugging Face-layout directory or Hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="most sequences decoded per step")
    p.add_argument(
        "--decode-batching",
        choices=("on", "off"),
        default="on",
        help="decode all active sequences in one forward per step (off: one forward per sequence)",
    )
    p.add_argument(
        "--sidecar-ranks", type=sidecar_ranks_arg, default=[], help="comma-separated sidecar ranks"
    )
    p.add_argument(
        "--receive-embeddings",
        action="store_true",
        help="encoder fission: media arrive as embedding forwards through the sidecar",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument(
        "--default-max-tokens", type=int, default=256, help="completion cap when a request sets none"
    )
    p.add_argument("--embedding-timeout-s", type=float, default=60.0, help="deadline per embedding forward")
    p.add_argument("--media-timeout-s", type=float, default=30.0, help="deadline per media fetch")
    return p


def parse_config(argv: list[str] | None = None) -> ExecutorConfig:
    """Parse flags and the CORNSERVE_NATS_URL / CORNSERVE_EXECUTOR_ID environment."""
    args = build_parser().parse_args(argv)
    return ExecutorConfig(
        model_id=args.model_id,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        decode_batching=args.decode_batching == "on",
        sidecar_ranks=args.sidecar_ranks,
        receive_embeddings=args.receive_embeddings,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        embedding_timeout_s=args.embedding_timeout_s,
        media_timeout_s=args.media_timeout_s,
        nats_url=os.environ.get("CORNSERVE_NATS_URL") or None,
        executor_id=os.environ.get("CORNSERVE_EXECUTOR_ID", "llm-executor"),
    )
