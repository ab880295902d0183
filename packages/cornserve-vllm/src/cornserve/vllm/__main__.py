"""`python -m cornserve.vllm`: the vLLM proxy for encoder-fission LLMTasks (see proxy.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from cornserve.bus.lifecycle import required_sidecar_ranks_arg
from cornserve.vllm.command import VLLMServeArgs
from cornserve.vllm.proxy import ProxyConfig, serve


def parse_args(argv: list[str]) -> ProxyConfig:
    """Flags as `VLLMDescriptor` passes them; arguments after `--` go to `vllm serve` as they are."""
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(prog="python -m cornserve.vllm")
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--sidecar-ranks",
        type=required_sidecar_ranks_arg,
        required=True,
        help="comma-separated; embeddings arrive on the first",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--vllm-executable", default="vllm")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--embedding-timeout", type=float, default=60.0)
    ns = parser.parse_args(argv)
    return ProxyConfig(
        serve=VLLMServeArgs(
            model=ns.model_id,
            host=ns.host,
            port=ns.port,
            tensor_parallel_size=ns.tensor_parallel_size,
            gpu_memory_utilization=ns.gpu_memory_utilization,
            max_model_len=ns.max_model_len,
            extra_args=extra,
        ),
        sidecar_rank=ns.sidecar_ranks[0],
        nats_url=os.environ.get("CORNSERVE_NATS_URL"),
        vllm_executable=ns.vllm_executable,
        ready_timeout_s=ns.ready_timeout,
        embedding_timeout_s=ns.embedding_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    code: int = asyncio.run(serve(parse_args(sys.argv[1:] if argv is None else argv)))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
