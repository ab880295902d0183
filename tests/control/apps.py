"""App sources for the end-to-end cluster tests (registered as strings, like a user would)."""

PIPELINE_APP = '''
from pydantic import BaseModel, Field
from cornserve.app import AppConfig
from cornserve.task import Task, TaskInput
from cornserve_tasklibs.tensor_math import (
    MakeMatrix, MakeMatrixInput, MatMul, MatMulInput, Reduce, ReduceInput, ReduceOutput,
)

class PipelineInput(TaskInput):
    seed: int
    n: int
    fail: bool = False

class Pipeline(Task[PipelineInput, ReduceOutput]):
    """make A, make B -> A @ B (forwards through the sidecar) -> reduce."""

    def post_init(self) -> None:
        self.make = MakeMatrix()
        self.matmul = MatMul()
        self.reduce = Reduce()

    def invoke(self, x: PipelineInput) -> ReduceOutput:
        a = self.make.invoke(MakeMatrixInput(seed=x.seed, rows=x.n, cols=x.n))
        b = self.make.invoke(MakeMatrixInput(seed=x.seed + 1, rows=x.n, cols=x.n))
        c = self.matmul.invoke(MatMulInput(a=a.matrix, b=b.matrix, fail=x.fail))
        return self.reduce.invoke(ReduceInput(x=c.matrix))

pipeline = Pipeline()

class Config(AppConfig):
    tasks = {"pipeline": pipeline}

class Request(BaseModel):
    seed: int
    n: int = Field(default=8, ge=1, le=64)
    fail: bool = False

class Response(BaseModel):
    sum: float
    shape: list[int]

async def serve(request: Request) -> Response:
    out = await pipeline(PipelineInput(seed=request.seed, n=request.n, fail=request.fail))
    return Response(sum=out.sum, shape=out.shape)
'''

# Shares MakeMatrix and Reduce with the pipeline app; has no MatMul.
SUM_APP = """
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve.task import Task, TaskInput
from cornserve_tasklibs.tensor_math import MakeMatrix, MakeMatrixInput, Reduce, ReduceInput, ReduceOutput

class SumInput(TaskInput):
    seed: int

class MatrixSum(Task[SumInput, ReduceOutput]):
    def post_init(self) -> None:
        self.make = MakeMatrix()
        self.reduce = Reduce()

    def invoke(self, x: SumInput) -> ReduceOutput:
        return self.reduce.invoke(ReduceInput(x=self.make.invoke(MakeMatrixInput(seed=x.seed, rows=3, cols=3)).matrix))

matrix_sum = MatrixSum()

class Config(AppConfig):
    tasks = {"sum": matrix_sum}

class Request(BaseModel):
    seed: int

class Response(BaseModel):
    sum: float

async def serve(request: Request) -> Response:
    return Response(sum=(await matrix_sum(SumInput(seed=request.seed))).sum)
"""

# Streams one item per row of a seeded matrix: MakeMatrix -> (sidecar) -> RowSums.
ROWS_APP = """
from collections.abc import AsyncIterator
from pydantic import BaseModel, Field
from cornserve.app import AppConfig
from cornserve.task import Stream, Task, TaskInput
from cornserve_tasklibs.tensor_math import MakeMatrix, MakeMatrixInput, RowSum, RowSums, RowSumsInput

class RowsInput(TaskInput):
    seed: int
    n: int

class MatrixRows(Task[RowsInput, Stream[RowSum]]):
    def post_init(self) -> None:
        self.make = MakeMatrix()
        self.rows = RowSums()

    def invoke(self, x: RowsInput) -> Stream[RowSum]:
        matrix = self.make.invoke(MakeMatrixInput(seed=x.seed, rows=x.n, cols=x.n)).matrix
        return self.rows.invoke(RowSumsInput(x=matrix))

matrix_rows = MatrixRows()

class Config(AppConfig):
    tasks = {"rows": matrix_rows}

class Request(BaseModel):
    seed: int
    n: int = Field(default=4, ge=1, le=64)

class Response(BaseModel):
    index: int
    sum: float

async def serve(request: Request) -> AsyncIterator[Response]:
    stream = await matrix_rows(RowsInput(seed=request.seed, n=request.n))
    async for item in stream:
        yield Response(index=item.index, sum=item.sum)
"""
