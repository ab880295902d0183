"""Eric's sidecar hand-off: a failed chunk send cancels its siblings and fails the request with 502.

The sidecar here is a stand-in (a real one cannot be made to fail one chunk while holding the
other): the tensor chunk's send blocks until cancelled, the meta chunk's send fails.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cornserve.eric.schemas import EmbeddingItem
from cornserve.eric.server import EricServer, RequestFailed
from cornserve.eric.settings import EricSettings
from cornserve.models.encoders import EncodedItem
from cornserve.sidecar.errors import SidecarError
from cornserve.task.builtins.embedding import EMBEDDING_META_CHUNK


class HalfFailingSidecar:
    """The meta chunk's send fails once every tensor chunk's send is under way; those wait to be cancelled."""

    def __init__(self, tensor_sends: int) -> None:
        self.started = 0
        self.all_started = asyncio.Event()
        self.tensor_sends = tensor_sends
        self.cancelled: list[str] = []

    async def send(self, data: Any, forward_id: str, dst: Any, *, chunk_id: int, **_: Any) -> None:
        if chunk_id == EMBEDDING_META_CHUNK:
            await asyncio.wait_for(self.all_started.wait(), 60)
            raise SidecarError(f"the sidecar refused {forward_id}")
        self.started += 1
        if self.started == self.tensor_sends:
            self.all_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.append(forward_id)
            raise


async def test_a_failed_chunk_cancels_the_other_sends_and_is_a_502() -> None:
    settings = EricSettings(model_id="m", modality="image", port=1, sidecar_ranks=[0])
    server = EricServer(settings)
    sidecar = HalfFailingSidecar(tensor_sends=2)
    server.sidecar = sidecar  # type: ignore[assignment]
    server.encoder = SimpleNamespace(llm_dtype=torch.float32)  # type: ignore[assignment]
    items = [
        EmbeddingItem(url="file:///x.png", forward_id=f"fwd-{i}", dst_sidecar_ranks=[[1]]) for i in range(2)
    ]
    encoded = [EncodedItem("image", torch.zeros(3, 4), None) for _ in items]
    body = SimpleNamespace(items=items)

    async def no_preprocessing(_: Any) -> list[Any]:
        return []

    async def encode(_: Any) -> list[EncodedItem]:
        return encoded

    server._preprocess_all = no_preprocessing  # type: ignore[method-assign]
    server.batcher = SimpleNamespace(encode=encode)  # type: ignore[assignment]
    try:
        with pytest.raises(RequestFailed) as failed:
            async with asyncio.timeout(60):
                await server._serve(body)  # type: ignore[arg-type]
        # The request fails as the sidecar's error (not an ExceptionGroup, which would be a 500) ...
        assert (failed.value.status, failed.value.kind) == (502, "sidecar_error")
        assert "the sidecar refused" in failed.value.message
        # ... and no tensor send is left writing for a request that already failed.
        assert sorted(sidecar.cancelled) == ["fwd-0", "fwd-1"]
    finally:
        server._pool.shutdown(wait=True)
        server._media.close()
