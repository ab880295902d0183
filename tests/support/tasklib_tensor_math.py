"""Tensor-math task library: small unit tasks whose executors do real torch math on the CPU.

Uploaded as a task library (e.g. `cornserve tasklib add tests/support/tasklib_tensor_math.py`,
name `tensor-math`) and used by the executor and end-to-end tests. Each unit task runs in a
`python -m cornserve.executor` process through a PythonExecutorDescriptor; matrices travel
between executors through the sidecar as `DataForward[Tensor]`.

    MakeMatrix(seed, rows, cols)  -> matrix forward     (deterministic: see make_matrix_tensor)
    MatMul(a, b, scale)           -> matrix forward     (scale * a @ b)
    Reduce(x)                     -> sum, mean, max, shape
    RowSums(x)                    -> Stream of RowSum   (one item per row)
    StreamRows(x)                 -> rows stream forward (DataForward[Stream[Tensor]]: one row per chunk)
    SumRows(rows)                 -> Stream of RowSum   (one item per row read from a stream forward)

Every input has a failure switch (`fail`, or `fail_after` for the stream) that makes the handler
raise ValueError with a clear message, for failure tests.
"""

import asyncio
from collections.abc import AsyncIterator

import torch
from pydantic import BaseModel, Field

from cornserve.executor import ExecutorContext, PythonExecutorDescriptor
from cornserve.sidecar.streaming import StreamWriter, read_stream
from cornserve.task import DataForward, Stream, TaskInput, TaskInvocation, TaskOutput, Tensor, UnitTask

# ----- pure math (also used by tests to compute the expected results directly) --------------------


def make_matrix_tensor(seed: int, rows: int, cols: int) -> torch.Tensor:
    """A deterministic float32 matrix: the same (seed, rows, cols) gives the same values anywhere."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32)


def matmul_tensor(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * a @ b, with a clear error for mismatched shapes."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"MatMul cannot multiply {list(a.shape)} by {list(b.shape)}")
    return (a @ b) * scale


# ----- task definitions ---------------------------------------------------------------------------


class MakeMatrixInput(TaskInput):
    seed: int
    rows: int = Field(ge=1, le=4096)
    cols: int = Field(ge=1, le=4096)
    fail: bool = False


class MatrixOutput(TaskOutput):
    matrix: DataForward[Tensor]


class MakeMatrix(UnitTask[MakeMatrixInput, MatrixOutput]):
    """Build a deterministic random matrix and forward it."""

    default_descriptor = "MakeMatrixExecutor"


class MatMulInput(TaskInput):
    a: DataForward[Tensor]
    b: DataForward[Tensor]
    scale: float = 1.0
    fail: bool = False


class MatMul(UnitTask[MatMulInput, MatrixOutput]):
    """Multiply two forwarded matrices and forward the product."""

    default_descriptor = "MatMulExecutor"


class ReduceInput(TaskInput):
    x: DataForward[Tensor]
    fail: bool = False


class ReduceOutput(TaskOutput):
    sum: float
    mean: float
    max: float
    shape: list[int]


class Reduce(UnitTask[ReduceInput, ReduceOutput]):
    """Reduce a forwarded matrix to plain numbers."""

    default_descriptor = "ReduceExecutor"


class RowSumsInput(TaskInput):
    x: DataForward[Tensor]
    fail_after: int | None = Field(default=None, ge=0)


class RowSum(BaseModel):
    index: int
    sum: float


class RowSums(UnitTask[RowSumsInput, Stream[RowSum]]):
    """Stream the sum of every row of a forwarded matrix, one item per row."""

    default_descriptor = "RowSumsExecutor"

    def make_output_placeholder(self, task_input: RowSumsInput) -> Stream[RowSum]:
        return Stream[RowSum].placeholder(self.display_name())


class StreamRowsInput(TaskInput):
    x: DataForward[Tensor]
    window: int = Field(default=2, ge=1)


class RowsOutput(TaskOutput):
    rows: DataForward[Stream[Tensor]]


class StreamRows(UnitTask[StreamRowsInput, RowsOutput]):
    """Stream the rows of a forwarded matrix to one consumer, one sidecar chunk per row."""

    default_descriptor = "StreamRowsExecutor"


class SumRowsInput(TaskInput):
    rows: DataForward[Stream[Tensor]]


class SumRows(UnitTask[SumRowsInput, Stream[RowSum]]):
    """Read a stream forward of rows and stream each row's sum as it arrives."""

    default_descriptor = "SumRowsExecutor"

    def make_output_placeholder(self, task_input: SumRowsInput) -> Stream[RowSum]:
        return Stream[RowSum].placeholder(self.display_name())


class MakeMatrixExecutor(PythonExecutorDescriptor[MakeMatrix]):
    handler: str = "make_matrix"


class MatMulExecutor(PythonExecutorDescriptor[MatMul]):
    handler: str = "matmul"


class ReduceExecutor(PythonExecutorDescriptor[Reduce]):
    handler: str = "reduce"


class RowSumsExecutor(PythonExecutorDescriptor[RowSums]):
    handler: str = "row_sums"


class StreamRowsExecutor(PythonExecutorDescriptor[StreamRows]):
    handler: str = "stream_rows"


class SumRowsExecutor(PythonExecutorDescriptor[SumRows]):
    handler: str = "sum_rows"


# ----- handlers (run inside `python -m cornserve.executor`) ----------------------------------------


async def _send(ctx: ExecutorContext, fwd: DataForward[Tensor], tensor: torch.Tensor) -> None:
    """Forward a tensor to every consumer the dispatcher wired to `fwd`."""
    if not fwd.dst_sidecar_ranks:
        raise ValueError(f"forward {fwd.id} has no destination ranks; was the graph wired?")
    await ctx.sidecar.send(tensor.contiguous(), id=fwd.id, dst_ranks=fwd.dst_sidecar_ranks)


async def _recv_all(ctx: ExecutorContext, *forwards: DataForward[Tensor]) -> list[torch.Tensor]:
    """Receive several forwards (private copies), then release them in the sidecar."""
    tensors = await asyncio.gather(*(ctx.sidecar.recv(f.id, copy=True) for f in forwards))
    await asyncio.gather(*(ctx.sidecar.mark_done(f.id) for f in forwards))
    return list(tensors)


async def make_matrix(ctx: ExecutorContext, invocation: TaskInvocation) -> MatrixOutput:
    inp = invocation.task_input
    out = invocation.task_output
    assert isinstance(inp, MakeMatrixInput) and isinstance(out, MatrixOutput)
    if inp.fail:
        raise ValueError(f"MakeMatrix was asked to fail (seed={inp.seed})")
    await _send(ctx, out.matrix, make_matrix_tensor(inp.seed, inp.rows, inp.cols))
    return out


async def matmul(ctx: ExecutorContext, invocation: TaskInvocation) -> MatrixOutput:
    inp = invocation.task_input
    out = invocation.task_output
    assert isinstance(inp, MatMulInput) and isinstance(out, MatrixOutput)
    a, b = await _recv_all(ctx, inp.a, inp.b)
    if inp.fail:
        raise ValueError(f"MatMul was asked to fail (scale={inp.scale})")
    await _send(ctx, out.matrix, matmul_tensor(a, b, inp.scale))
    return out


async def reduce(ctx: ExecutorContext, invocation: TaskInvocation) -> ReduceOutput:
    inp = invocation.task_input
    assert isinstance(inp, ReduceInput)
    (x,) = await _recv_all(ctx, inp.x)
    if inp.fail:
        raise ValueError("Reduce was asked to fail")
    return ReduceOutput(sum=float(x.sum()), mean=float(x.mean()), max=float(x.max()), shape=list(x.shape))


async def row_sums(ctx: ExecutorContext, invocation: TaskInvocation) -> AsyncIterator[RowSum]:
    inp = invocation.task_input
    assert isinstance(inp, RowSumsInput)
    (x,) = await _recv_all(ctx, inp.x)
    sums = x.sum(dim=1).tolist()
    for index, value in enumerate(sums):
        if inp.fail_after is not None and index >= inp.fail_after:
            raise ValueError(f"RowSums was asked to fail after {inp.fail_after} rows")
        yield RowSum(index=index, sum=value)
        await asyncio.sleep(0)


async def stream_rows(ctx: ExecutorContext, invocation: TaskInvocation) -> RowsOutput:
    inp = invocation.task_input
    out = invocation.task_output
    assert isinstance(inp, StreamRowsInput) and isinstance(out, RowsOutput)
    (x,) = await _recv_all(ctx, inp.x)
    if not out.rows.dst_sidecar_ranks:
        raise ValueError(f"forward {out.rows.id} has no destination ranks; was the graph wired?")
    async with StreamWriter(
        ctx.sidecar, out.rows.id, out.rows.dst_sidecar_ranks, window=inp.window
    ) as writer:
        for row in x:
            await writer.send(row.contiguous())
    return out


async def sum_rows(ctx: ExecutorContext, invocation: TaskInvocation) -> AsyncIterator[RowSum]:
    inp = invocation.task_input
    assert isinstance(inp, SumRowsInput)
    index = 0
    async for row in read_stream(ctx.sidecar, inp.rows.id, timeout=60):
        yield RowSum(index=index, sum=float(row.sum()))
        index += 1
