"""Producer executor stand-in, run as its own process by the cross-process tests.

usage: producer_proc.py RANK DST_RANK ID MODE   (MODE: alloc | copy | numpy | stream | cuda)
Writes with the *sync* API from a plain thread, as an engine thread would.
"""

import sys

import numpy as np
import torch

from cornserve.sidecar import Sidecar


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
            # CUDA IPC: our process must keep the tensor alive until the consumer is done.
            t = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
            sc.send_sync(t, id_, [[dst]])
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
