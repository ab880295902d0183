"""Producer and consumer in separate OS processes, through real sidecar server processes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cornserve.sidecar import Sidecar

PRODUCER = Path(__file__).with_name("producer_proc.py")


def run_producer(rank, dst, id_, mode):
    return subprocess.Popen([sys.executable, str(PRODUCER), str(rank), str(dst), id_, mode])


@pytest.mark.slow  # ~10 s each; the in-process transfer tests cover the same paths
@pytest.mark.parametrize("nodes", [["n1", "n1"], ["n1", "n2"]], ids=["shm", "tcp"])
async def test_producer_process_to_consumer_process(sidecars, env_nats, stats_of, nodes):
    a, b = await sidecars(2, nodes=nodes)
    procs = [run_producer(a.rank, b.rank, f"t-{m}", m) for m in ("alloc", "copy", "numpy", "stream")]
    async with Sidecar(b.rank) as dst:  # URL from CORNSERVE_NATS_URL
        expect = torch.arange(512 * 512, dtype=torch.float32).view(512, 512)
        for mode in ("alloc", "copy"):
            got = await dst.recv(f"t-{mode}", timeout=60)
            assert torch.equal(got, expect)
            await dst.mark_done(f"t-{mode}")
        arr = await dst.recv("t-numpy", timeout=60)
        np.testing.assert_array_equal(arr, np.arange(100, dtype=np.float64))
        await dst.mark_done("t-numpy")
        tokens = []
        i = 0
        while (item := await dst.recv("t-stream", chunk_id=i, timeout=60)) is not None:
            tokens.append(item["token"])
            await dst.mark_done("t-stream", i)
            i += 1
        assert tokens == list(range(5))
    for p in procs:
        assert p.wait(timeout=60) == 0
    stats = await stats_of([a.rank, b.rank])
    assert all(s.used_bytes == 0 for s in stats.values()), stats


def test_the_client_without_its_extra_says_what_to_install() -> None:
    """Where torch is not installed (a sidecar-only host), asking for the client names the extra."""
    probe = (
        "import sys; sys.modules.update(torch=None, numpy=None)\n"
        "import cornserve.sidecar.server  # the server imports fine\n"
        "from cornserve.sidecar import Sidecar\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "install 'cornserve-sidecar[client]'" in result.stderr
