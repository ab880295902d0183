"""An embedding forward's two chunks are received at once, and a failure of one ends the other.

The encoder sends the tensor and its metadata at once; receiving them one after the other cost a
second round trip to the sidecar in every fission request's time to first token. The sidecar is a
stand-in here (`waitfor.py`): what is tested is which receives the executor has asked for, and
when, which a real sidecar does not show.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from tests.llm_executor.waitfor import WaitForSidecar, loop_turns
from tests.support.waiting import wait_for

from cornserve.llm_executor.embeddings import EmbeddingReceiver
from cornserve.llm_executor.errors import EmbeddingError
from cornserve.sidecar.errors import SidecarError
from cornserve.task import DataForward, Tensor
from cornserve.task.builtins.embedding import EMBEDDING_META_CHUNK, EMBEDDING_TENSOR_CHUNK

META = {"modality": "image", "num_tokens": 2, "dtype": "float32"}


def start(sidecar: WaitForSidecar) -> tuple[EmbeddingReceiver, asyncio.Task[object]]:
    receiver = EmbeddingReceiver(sidecar, timeout_s=60)  # type: ignore[arg-type]
    forward = DataForward[Tensor](dst_sidecar_ranks=[[0]])
    return receiver, asyncio.create_task(receiver.receive_all([forward]))


async def test_both_chunks_are_asked_for_before_either_arrives() -> None:
    sidecar = WaitForSidecar()
    receiver, receiving = start(sidecar)
    await loop_turns()
    assert sorted(sidecar.replies) == sorted([EMBEDDING_TENSOR_CHUNK, EMBEDDING_META_CHUNK])
    sidecar.send(EMBEDDING_META_CHUNK, META)  # the metadata may come first
    await loop_turns()
    assert not receiving.done()
    sidecar.send(EMBEDDING_TENSOR_CHUNK, torch.ones(2, 4))
    received = await asyncio.wait_for(receiving, 10)
    assert isinstance(received, list) and received[0].meta.num_tokens == 2
    assert torch.equal(received[0].tensor, torch.ones(2, 4))
    await receiver.close()  # the background release of both chunks
    assert sorted(sidecar.done) == sorted([EMBEDDING_TENSOR_CHUNK, EMBEDDING_META_CHUNK])


async def test_a_failed_chunk_ends_the_other_receive_and_releases_what_arrived() -> None:
    sidecar = WaitForSidecar()
    receiver, receiving = start(sidecar)
    await loop_turns()
    sidecar.send(EMBEDDING_TENSOR_CHUNK, torch.ones(2, 4))
    await loop_turns()
    sidecar.reply(EMBEDDING_META_CHUNK).set_exception(SidecarError("chunk 1 was dropped"))
    with pytest.raises(EmbeddingError, match="chunk 1 was dropped"):
        await asyncio.wait_for(receiving, 10)
    assert sidecar.done == [EMBEDDING_TENSOR_CHUNK]  # released before the error reached the caller
    await receiver.close()


async def test_a_failure_while_the_tensor_is_awaited_cancels_that_receive() -> None:
    sidecar = WaitForSidecar()
    receiver, receiving = start(sidecar)
    await loop_turns()
    tensor_reply = sidecar.reply(EMBEDDING_TENSOR_CHUNK)
    sidecar.reply(EMBEDDING_META_CHUNK).set_exception(SidecarError("chunk 1 was dropped"))
    with pytest.raises(EmbeddingError):
        await asyncio.wait_for(receiving, 10)
    await wait_for(tensor_reply.cancelled, 10, "the tensor's receive to be cancelled")
    assert sidecar.done == []  # nothing arrived, nothing to release
    await receiver.close()
