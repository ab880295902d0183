"""Producer executor stand-in, run as its own process by the cross-process tests.

usage: producer_proc.py RANK DST_RANK ID MODE   (MODE: alloc | copy | numpy | stream | cuda)
Writes with the *sync* API from a plain thread, as an engine thread would.
"""

import sys

import numpy as np
import torch

from cornserve.sidecar import Sidecar


def cuda_payload() -> torch.Tensor:
    """The CUDA test values (seeded, so consumers rebuild them bit for bit)."""
    gen = torch.Generator(device="cuda").manual_seed(1234)
    return torch.randn(1 << 20, generator=gen, device="cuda")


def main() -> None:
    rank, dst, id_, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sc = Sidecar(rank).connect_sync()  # URL from CORNSERVE_NATS_URL
    try:
        if mode == "alloc":
            out = sc.alloc_tensor_sync((512, 512), torch.float32)
            torch.arange(512 * 512, dtype=torch.float32, out=out.view(-1))
            sc.send_sync(out, id_, [[dst]])
        elif mode == "copy":
            sc.send_sync(torch.arange(512 * 512, dtype=torch.float32).view(512, 512), id_, [[dst]])
        elif mode == "numpy":
            sc.send_sync(np.arange(100, dtype=np.float64), id_, [[dst]])
        elif mode == "cuda":
            # A slice at a non-zero offset of a larger buffer, written on a side stream that is still
            # busy when the sync API sends it (no synchronize here), then overwritten right after
            # send: consumers must see exactly the value at send time.
            big = torch.empty(3 << 20, dtype=torch.float32, device="cuda")
            t = big[1 << 20 : 2 << 20]
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued before the write
                t.copy_(cuda_payload())
                sc.send_sync(t, id_, [[dst]])
                t.fill_(-1.0)
            assert sc.recv_sync(f"{id_}-ack", timeout=120) == "done"
            sc.mark_done_sync(f"{id_}-ack")
        elif mode == "stream":
            for i in range(5):
                sc.send_sync({"token": i}, id_, [[dst]], chunk_id=i, num_chunks=None)
            sc.close_stream_sync(id_, 5)
    finally:
        sc.close_sync()


if __name__ == "__main__":
    main()
