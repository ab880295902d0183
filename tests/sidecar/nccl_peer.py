"""One side of the NCCL pairwise test: usage nccl_peer.py RANK PEER (uid exchanged over NATS)."""

import asyncio
import os
import sys

import nats
import torch

from cornserve.sidecar.gpu import NatsUidExchange, NcclPairs


async def main() -> None:
    rank, peer = int(sys.argv[1]), int(sys.argv[2])
    device = rank % torch.cuda.device_count()
    torch.cuda.set_device(device)
    nc = await nats.connect(os.environ["CORNSERVE_NATS_URL"])
    try:
        pairs = NcclPairs(rank)
        comm = await pairs.comm(peer, NatsUidExchange(nc, rank))
        my_index, peer_index = (0, 1) if rank < peer else (1, 0)
        assert my_index in (0, 1)
        if rank < peer:
            NcclPairs.send(comm, torch.arange(1024, dtype=torch.float32, device="cuda"), peer_index)
        else:
            out = torch.empty(1024, dtype=torch.float32, device="cuda")
            NcclPairs.recv(comm, out, peer_index)
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), torch.arange(1024, dtype=torch.float32))
            print("received ok", flush=True)
        torch.cuda.synchronize()
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
