import numpy as np
import torch

from cornserve.sidecar import Sidecar


async def test_send_recv_same_node(sidecars, nats_url, stats_of):
    a, b = await sidecars(2)
    async with Sidecar(a.rank, nats_url) as src, Sidecar(b.rank, nats_url) as dst:
        t = torch.arange(1000, dtype=torch.float32)
        await src.send(t, "x", [[b.rank]])
        got = await dst.recv("x", timeout=5)
        assert torch.equal(got, t)
        assert await dst.recv("x", timeout=5) is not None
        await dst.mark_done("x")
        await src.send({"a": [1, 2.5, "s", b"b", None, True]}, "o", [[b.rank]])
        assert await dst.recv("o", timeout=5) == {"a": [1, 2.5, "s", b"b", None, True]}
        await dst.mark_done("o")
        arr = np.ones((3, 4), dtype=np.int16)
        await src.send(arr, "n", [[b.rank]])
        got_n = await dst.recv("n", timeout=5)
        assert isinstance(got_n, np.ndarray) and not got_n.flags.writeable
        np.testing.assert_array_equal(got_n, arr)
        await dst.mark_done("n")
    stats = await stats_of([a.rank, b.rank])
    assert all(s.used_bytes == 0 for s in stats.values()), stats
