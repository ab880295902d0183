"""`python -m cornserve.vllm`: the vLLM proxy for encoder-fission LLMTasks (see proxy.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, ClassVar

from pydantic import Field

from cornserve.runtime.service import run_process
from cornserve.runtime.settings import (
    Flag,
    ProcessInfo,
    RequiredSidecarRanks,
    ServiceSettings,
)
from cornserve.vllm.command import VLLMServeArgs
from cornserve.vllm.proxy import ProxyConfig, serving


class VLLMProxySettings(ServiceSettings):
    """Flags as `VLLMDescriptor` passes them (and ``CORNSERVE_*`` environment)."""

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "vllm-proxy",
        "python -m cornserve.vllm",
        "Cornserve's proxy in front of `vllm serve` (arguments after -- go to vllm)",
    )

    model_id: str = Field(min_length=1)
    """Checkpoint `vllm serve` loads."""
    host: str = "127.0.0.1"
    """Address the proxy listens on."""
    port: int = Field(gt=0, lt=65536)
    """Port the proxy listens on (vLLM itself gets a private one)."""
    sidecar_ranks: RequiredSidecarRanks
    """Comma-separated sidecar ranks; embeddings arrive on the first."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """vLLM's --tensor-parallel-size."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """vLLM's --gpu-memory-utilization."""
    max_model_len: int | None = Field(default=None, ge=1)
    """vLLM's --max-model-len (default: the model's)."""
    vllm_executable: str = "vllm"
    """The `vllm` command."""
    ready_timeout_s: Annotated[float, Flag(name="--ready-timeout")] = Field(default=1800.0, gt=0)
    """Seconds vLLM has to become healthy (a first large tensor-parallel start compiles for minutes)."""
    probe_timeout_s: Annotated[float, Flag(name="--probe-timeout")] = Field(default=5.0, gt=0)
    """Seconds one probe of vLLM's /health may take while it starts."""
    progress_interval_s: Annotated[float, Flag(name="--progress-interval")] = Field(default=30.0, gt=0)
    """Seconds between log lines while vLLM starts."""
    embedding_timeout_s: Annotated[float, Flag(name="--embedding-timeout")] = Field(default=60.0, gt=0)
    """Seconds one embedding forward may take to arrive."""


VLLM_SERVE_FIELDS = {"host", "port", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len"}
"""Settings that `VLLMServeArgs` takes under the same name."""


def split_vllm_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The proxy's own flags, and the arguments after `--` that go to `vllm serve` as they are."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def proxy_config(settings: VLLMProxySettings, vllm_args: list[str]) -> ProxyConfig:
    """What the proxy runs with."""
    return ProxyConfig(
        serve=VLLMServeArgs(
            model=settings.model_id,
            extra_args=vllm_args,
            **settings.model_dump(include=VLLM_SERVE_FIELDS),
        ),
        sidecar_rank=settings.sidecar_ranks[0],
        nats_url=settings.nats_url,
        vllm_executable=settings.vllm_executable,
        ready_timeout_s=settings.ready_timeout_s,
        probe_timeout_s=settings.probe_timeout_s,
        progress_interval_s=settings.progress_interval_s,
        embedding_timeout_s=settings.embedding_timeout_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: through the runtime (settings, logging, signals, bounded stop), the proxy and its vLLM.

    Exit codes: 0 after SIGTERM/SIGINT, 1 when vLLM exits or never becomes healthy, 2 on bad flags.
    """
    own, vllm_args = split_vllm_args(sys.argv[1:] if argv is None else argv)
    return run_process(
        VLLMProxySettings, lambda settings: serving(proxy_config(settings, vllm_args)), argv=own
    )


if __name__ == "__main__":
    raise SystemExit(main())
