"""GPU paths (CUDA IPC, NCCL). Skipped without CuPy and a CUDA device; bench/gpu_check.sh runs them.

One GPU: IPC between processes (a slice at a non-zero offset, written on a busy side stream, sent
with the sync API, overwritten after send: bit-identical on arrival), a send to one's own rank
(no IPC open in the exporting process), an NCCL send-to-self in one group call, and the clean error
NCCL's refusal of two ranks on one GPU becomes. Two GPUs: a CUDA tensor across nodes over NCCL.
"""

import asyncio
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cornserve.bus.sidecar import DataMeta, Location
from cornserve.sidecar import Sidecar, gpu_ipc, gpu_nccl
from cornserve.sidecar.errors import GpuTransferFailed
from cornserve.sidecar.gpu import gpu_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA device"),
]

PRODUCER = Path(__file__).with_name("producer_proc.py")
READER = Path(__file__).with_name("ipc_reader.py")


def cuda_payload(device: str = "cuda") -> torch.Tensor:
    """The values producer_proc.py sends in `cuda` mode (same seed, same generator)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    return torch.randn(1 << 20, generator=gen, device=device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32).cpu()


async def test_cuda_ipc_between_processes_same_node(sidecars, env_nats, stats_of):
    a, b = await sidecars(2)
    proc = subprocess.Popen([sys.executable, str(PRODUCER), str(a.rank), str(b.rank), "g", "cuda"])
    async with Sidecar(b.rank) as dst:
        got = await dst.recv("g", timeout=120)
        assert got.is_cuda  # device to device: no host bounce
        assert torch.equal(bits(got), bits(cuda_payload()))  # the value at send, not after
        copy = await dst.recv("g", timeout=5, copy=True)
        assert copy.data_ptr() != got.data_ptr()
        del got
        await dst.mark_done("g")
        await dst.send("done", "g-ack", [[a.rank]])
    assert proc.wait(timeout=120) == 0
    stats = await stats_of([a.rank, b.rank])
    assert all(s.used_bytes == 0 and s.held_entries == 0 for s in stats.values())


def test_ipc_export_at_a_nonzero_offset_is_read_bit_identical_by_another_process():
    big = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
    view = big[4096 : 4096 + (1 << 20)]
    view.copy_(torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    exp = gpu_ipc.export(view)
    try:
        base, _ = gpu_ipc.allocation_range(view.data_ptr())
        assert exp.offset == view.data_ptr() - base and exp.offset >= 4096
        loc = Location(
            transport="cuda_ipc",
            offset=exp.offset,
            size=1 << 20,
            meta=DataMeta(kind="cuda", dtype="uint8", shape=[1 << 20], nbytes=1 << 20),
            cuda_handle=exp.handle,
            device=exp.device,
        )
        out = subprocess.run(
            [sys.executable, str(READER), loc.model_dump_json()], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == hashlib.sha256(view.cpu().numpy().tobytes()).hexdigest()
        # In the exporting process the registry answers: CUDA would refuse to open our own handle.
        assert gpu_ipc.IpcMappings().view(("local", 0), loc, 0) is view
    finally:
        gpu_ipc.LOCAL_EXPORTS.remove(exp.handle, exp.offset)


async def test_send_to_own_rank_from_a_side_stream_needs_no_ipc_open(sidecars, env_nats, stats_of):
    (a,) = await sidecars(1)
    async with Sidecar(a.rank) as sc:
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            torch.cuda._sleep(100_000_000)
            t = cuda_payload()
        await sc.send(t, "self", [[a.rank]])
        t.fill_(0.0)  # after send: the consumer keeps the value at send
        got = await sc.recv("self", timeout=30)
        assert got.is_cuda and torch.equal(bits(got), bits(cuda_payload()))
        await sc.mark_done("self")
        deadline = time.monotonic() + 20
        while sc._gpu_hold and time.monotonic() < deadline:  # released by the server's event
            await asyncio.sleep(0.05)
        assert not sc._gpu_hold
    stats = await stats_of([a.rank])
    assert stats[a.rank].held_entries == 0


async def test_nccl_send_to_self_in_one_group_call():
    uid = gpu_nccl.new_unique_id()
    assert isinstance(uid, bytes) and len(uid) == gpu_nccl.UNIQUE_ID_BYTES
    uid = gpu_nccl.uid_from_wire(gpu_nccl.uid_to_wire(uid))  # as it crosses the bus
    link = await gpu_nccl.open_link(uid, 1, 0, 0, time.monotonic() + 60)
    try:
        with torch.cuda.stream(link.stream):
            src = cuda_payload()
            out = torch.empty_like(src)
        await gpu_nccl.run(link, gpu_nccl.self_exchange_op(src, out), time.monotonic() + 60, "self exchange")
        assert torch.equal(bits(out), bits(src))
    finally:
        link.abort()


async def test_two_ranks_on_one_gpu_is_a_clean_error_across_nodes(sidecars, env_nats):
    """The real cross-node path on one GPU: the unique id crosses the bus, then NCCL refuses the pair."""
    a, b = await sidecars(2, nodes=["gpu-node-a", "gpu-node-b"])
    proc = subprocess.Popen([sys.executable, str(PRODUCER), str(a.rank), str(b.rank), "gx", "cuda"])
    try:
        async with Sidecar(b.rank) as dst:
            with pytest.raises(GpuTransferFailed, match="Duplicate GPU"):
                await dst.recv("gx", timeout=60, device=0)
            await dst.mark_done("gx")
            await dst.send("done", "gx-ack", [[a.rank]])
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()


two_gpus = pytest.mark.skipif(
    not gpu_available() or torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one per rank)"
)


@two_gpus
async def test_cuda_tensor_across_nodes_goes_over_nccl(sidecars, env_nats, stats_of):
    a, b = await sidecars(2, nodes=["gpu-node-a", "gpu-node-b"])
    proc = subprocess.Popen([sys.executable, str(PRODUCER), str(a.rank), str(b.rank), "gx", "cuda"])
    async with Sidecar(b.rank) as dst:
        got = await dst.recv("gx", timeout=180, device=1)  # the producer process uses device 0
        assert got.is_cuda and got.device.index == 1
        assert torch.equal(bits(got), bits(cuda_payload("cuda:1")))
        await dst.mark_done("gx")
        await dst.send("done", "gx-ack", [[a.rank]])
    assert proc.wait(timeout=120) == 0
    stats = await stats_of([a.rank, b.rank])
    assert all(s.held_entries == 0 for s in stats.values())
