"""cornserve.sidecar: out-of-band tensor forwarding between executors.

``Sidecar`` (the client) is imported lazily so the server process never pays for importing torch.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING, Any

__version__ = version("cornserve-sidecar")

if TYPE_CHECKING:
    from cornserve.sidecar.client import Sidecar

__all__ = ["Sidecar", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Sidecar":
        from cornserve.sidecar.client import Sidecar

        return Sidecar
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
