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


CLIENT_EXTRA_MODULES = ("torch", "numpy")
"""What the client needs beyond the server: the `client` extra of `cornserve-sidecar`."""


def __getattr__(name: str) -> Any:
    if name == "Sidecar":
        try:
            from cornserve.sidecar.client import Sidecar
        except ModuleNotFoundError as exc:
            if exc.name not in CLIENT_EXTRA_MODULES:
                raise
            raise ModuleNotFoundError(
                f"the sidecar client needs {exc.name}, which this environment lacks: install "
                "'cornserve-sidecar[client]' (the sidecar server alone needs neither torch nor numpy)",
                name=exc.name,
            ) from exc
        return Sidecar
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
