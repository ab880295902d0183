"""The apps the gateway fuzz test registers: request models rich enough to fuzz, cheap tasks behind them.

Their request schemas nest a model (so the OpenAPI document must carry it as a component), bound
every number a task uses (so every request the schema allows is one the tasks can serve), and
carry strings, lists, enums and floats the fuzzer can bend.
"""

FUZZ_SUM_APP = """
from typing import Literal
from pydantic import BaseModel, Field
from cornserve.app import AppConfig
from cornserve.task import Task, TaskInput
from cornserve_tasklibs.tensor_math import MakeMatrix, MakeMatrixInput, Reduce, ReduceInput, ReduceOutput

class SumInput(TaskInput):
    seed: int
    rows: int
    cols: int

class MatrixSum(Task[SumInput, ReduceOutput]):
    def post_init(self) -> None:
        self.make = MakeMatrix()
        self.reduce = Reduce()

    def invoke(self, x: SumInput) -> ReduceOutput:
        matrix = self.make.invoke(MakeMatrixInput(seed=x.seed, rows=x.rows, cols=x.cols)).matrix
        return self.reduce.invoke(ReduceInput(x=matrix))

matrix_sum = MatrixSum()

class Config(AppConfig):
    tasks = {"sum": matrix_sum}

class Shape(BaseModel):
    rows: int = Field(ge=1, le=8)
    cols: int = Field(ge=1, le=8)

class Request(BaseModel):
    seed: int = Field(ge=0, le=2**32 - 1)
    shape: Shape = Shape(rows=2, cols=2)
    reduce: Literal["sum", "mean", "max"] = "sum"
    scale: float = Field(default=1.0, ge=-1000, le=1000)
    label: str = Field(default="", max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=8)

class Response(BaseModel):
    value: float
    shape: list[int]
    label: str
    tags: list[str]

async def serve(request: Request) -> Response:
    shape = request.shape
    out = await matrix_sum(SumInput(seed=request.seed, rows=shape.rows, cols=shape.cols))
    value = {"sum": out.sum, "mean": out.mean, "max": out.max}[request.reduce] * request.scale
    return Response(value=value, shape=out.shape, label=request.label, tags=request.tags)
"""

FUZZ_ROWS_APP = """
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
    seed: int = Field(ge=0, le=2**32 - 1)
    n: int = Field(default=3, ge=1, le=8)
    prefix: str = Field(default="row", max_length=32)

class Response(BaseModel):
    name: str
    index: int
    sum: float

async def serve(request: Request) -> AsyncIterator[Response]:
    stream = await matrix_rows(RowsInput(seed=request.seed, n=request.n))
    async for item in stream:
        yield Response(name=f"{request.prefix}{item.index}", index=item.index, sum=item.sum)
"""

FUZZ_APPS = {"fuzz-sum": FUZZ_SUM_APP, "fuzz-rows": FUZZ_ROWS_APP}
