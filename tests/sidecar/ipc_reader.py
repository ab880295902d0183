"""Opens a CUDA IPC location in a process of its own: usage ipc_reader.py LOCATION_JSON.

Prints the SHA-256 of the bytes it reads, so the exporting test can compare them bit for bit.
"""

import hashlib
import sys

import torch

from cornserve.bus.sidecar import Location
from cornserve.sidecar.gpu_ipc import IpcMappings


def main() -> None:
    loc = Location.model_validate_json(sys.argv[1])
    mappings = IpcMappings()
    view = mappings.view(("reader", 0), loc, 0)
    torch.cuda.synchronize()
    print(hashlib.sha256(view.cpu().numpy().tobytes()).hexdigest(), flush=True)
    del view
    mappings.close(("reader", 0))


if __name__ == "__main__":
    main()
