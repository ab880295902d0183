"""A stream between two tasks on the shared real cluster: gateway → dispatcher → Python executors.

MakeMatrix → StreamRows ⇢ SumRows (tensor-math): StreamRows sends the matrix row by row through the
sidecars as a stream forward with a window of 2 chunks, SumRows streams each row's sum to the
caller as it reads it. StreamRows is in the graph's tail (its output is only the forward), so the
reply does not wait for it. Checked: every sum, in order, against torch; then nothing of it is left
in any arena.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from tests.control.support import admin_nats, call, ensure_tasklib, make_matrix_tensor
from tests.support.waiting import wait_for

from cornserve.bus.micro import request
from cornserve.bus.sidecar import StatsReply, StatsRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.cli.launcher import LocalCluster

ROWS_APP = """
from collections.abc import AsyncIterator
from pydantic import BaseModel, Field
from cornserve.app import AppConfig
from cornserve.task import Stream, Task, TaskInput
from cornserve_tasklibs.tensor_math import (
    MakeMatrix, MakeMatrixInput, RowSum, StreamRows, StreamRowsInput, SumRows, SumRowsInput,
)

class RowsInput(TaskInput):
    seed: int
    n: int

class StreamedSums(Task[RowsInput, Stream[RowSum]]):
    def post_init(self) -> None:
        self.make = MakeMatrix()
        self.rows = StreamRows()
        self.sums = SumRows()

    def invoke(self, x: RowsInput) -> Stream[RowSum]:
        made = self.make.invoke(MakeMatrixInput(seed=x.seed, rows=x.n, cols=4))
        rows = self.rows.invoke(StreamRowsInput(x=made.matrix, window=2)).rows
        return self.sums.invoke(SumRowsInput(rows=rows))

sums = StreamedSums()

class Config(AppConfig):
    tasks = {"sums": sums}

class Request(BaseModel):
    seed: int
    n: int = Field(default=16, ge=1, le=256)

async def serve(request: Request) -> AsyncIterator[RowSum]:
    async for item in await sums(RowsInput(seed=request.seed, n=request.n)):
        yield item
"""


async def arenas_used(cluster: LocalCluster) -> int:
    """Bytes used plus chunks held, over every sidecar of the cluster (CPU slots: ranks 0..n-1)."""
    nc = await admin_nats(cluster)
    try:
        total = 0
        for rank in range(cluster.cpu_slots):
            stats = await request(
                nc, sidecar_subject(rank, SidecarVerb.STATS), StatsRequest(), StatsReply, 5.0
            )
            total += stats.used_bytes + stats.held_entries
        return total
    finally:
        await nc.close()


@pytest.mark.slow  # three Python executors started on the shared cluster: behind `slow`
async def test_rows_stream_between_executors_through_the_cluster(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    await ensure_tasklib(http)
    status, app = await call(http, "POST", "/apps", {"name": "row-stream", "source": ROWS_APP})
    assert status == 201, app
    try:
        for seed in (3, 4):
            async with http.post("/apps/row-stream/invoke", json={"seed": seed, "n": 16}) as response:
                assert response.status == 200, await response.text()
                items = [json.loads(line) async for line in response.content if line.strip()]
            want = make_matrix_tensor(seed, 16, 4).sum(dim=1).tolist()
            assert [item["index"] for item in items] == list(range(16))
            assert [item["sum"] for item in items] == pytest.approx(want, rel=1e-5, abs=1e-5)
        await wait_for(lambda: _empty(cluster), 30, "every streamed row released in the arenas")
    finally:
        status, body = await call(http, "DELETE", "/apps/row-stream")
        assert status == 200, body


async def _empty(cluster: LocalCluster) -> bool:
    return await arenas_used(cluster) == 0
