"""GPU paths (CUDA IPC, NCCL). Skipped without CuPy and a CUDA device; run with bench/gpu_check.sh."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cornserve.sidecar import Sidecar
from cornserve.sidecar.gpu import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device"),
]

PRODUCER = Path(__file__).with_name("producer_proc.py")
NCCL_PEER = Path(__file__).with_name("nccl_peer.py")


async def test_cuda_ipc_between_processes_same_node(sidecars, env_nats, stats_of):
    a, b = await sidecars(2)
    proc = subprocess.Popen([sys.executable, str(PRODUCER), str(a.rank), str(b.rank), "g", "cuda"])
    async with Sidecar(b.rank) as dst:
        got = await dst.recv("g", timeout=120)
        assert got.is_cuda  # device to device: no host bounce
        assert torch.equal(got.cpu(), torch.arange(1 << 20, dtype=torch.float32))
        copy = await dst.recv("g", timeout=5, copy=True)
        assert copy.data_ptr() != got.data_ptr()
        del got
        await dst.mark_done("g")
        await dst.send("done", "g-ack", [[a.rank]])
    assert proc.wait(timeout=120) == 0
    stats = await stats_of([a.rank, b.rank])
    assert all(s.used_bytes == 0 and s.held_entries == 0 for s in stats.values())


@pytest.mark.skipif(not gpu_available() or torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
async def test_nccl_pairwise_communicator_with_uid_over_nats(env_nats):
    procs = [
        subprocess.Popen(
            [sys.executable, str(NCCL_PEER), str(rank), str(1 - rank)], stdout=subprocess.PIPE, text=True
        )
        for rank in (0, 1)
    ]
    outs = await asyncio.gather(*(asyncio.to_thread(p.communicate, timeout=180) for p in procs))
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "received ok" in outs[1][0]


two_gpus = pytest.mark.skipif(
    not gpu_available() or torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one per rank)"
)


@two_gpus
async def test_cuda_tensor_across_nodes_goes_over_nccl(sidecars, env_nats, stats_of):
    a, b = await sidecars(2, nodes=["gpu-node-a", "gpu-node-b"])
    proc = subprocess.Popen([sys.executable, str(PRODUCER), str(a.rank), str(b.rank), "gx", "cuda"])
    torch.cuda.set_device(1)  # the producer process uses device 0
    async with Sidecar(b.rank) as dst:
        got = await dst.recv("gx", timeout=180)
        assert got.is_cuda and got.device.index == 1
        assert torch.equal(got.cpu(), torch.arange(1 << 20, dtype=torch.float32))
        await dst.mark_done("gx")
        await dst.send("done", "gx-ack", [[a.rank]])
    assert proc.wait(timeout=120) == 0
    stats = await stats_of([a.rank, b.rank])
    assert all(s.held_entries == 0 for s in stats.values())
