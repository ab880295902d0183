"""Task library of the dispatch benchmark (`bench/dispatch.py` uploads it as `dispatch-bench`).

Three trivial unit tasks, so the benchmark measures the serving system rather than the work:

    BenchProduce(seed)     -> tensor forward  (a 4 KiB float32 tensor, sent through the sidecar)
    BenchConsume(x)        -> sum             (receives the forward, returns its sum)
    BenchProduceSum(seed)  -> sum             (both stages in one executor, no forward: the floor)

The file is self-contained (it is executed from source inside every Cornserve service), and the
benchmark's client and its Ray Serve deployments import `make_tensor`/`expected_sum` from it so
all systems compute and check exactly the same values.
"""

import torch

from cornserve.executor import ExecutorContext, PythonExecutorDescriptor
from cornserve.task import DataForward, TaskInput, TaskInvocation, TaskOutput, Tensor, UnitTask

NUM_ELEMENTS = 1024
"""4 KiB of float32."""

_BASE_SUM = NUM_ELEMENTS * (NUM_ELEMENTS - 1) // 2


def make_tensor(seed: int) -> torch.Tensor:
    """`arange(1024) + seed % 1000` as float32: every partial sum is an integer below 2**24, so exact."""
    return torch.arange(NUM_ELEMENTS, dtype=torch.float32) + float(seed % 1000)


def expected_sum(seed: int) -> float:
    """The sum of `make_tensor(seed)`, computed in closed form (independent of torch)."""
    return float(_BASE_SUM + NUM_ELEMENTS * (seed % 1000))


class SeedInput(TaskInput):
    seed: int


class TensorOutput(TaskOutput):
    tensor: DataForward[Tensor]


class ConsumeInput(TaskInput):
    x: DataForward[Tensor]


class SumOutput(TaskOutput):
    sum: float


class BenchProduce(UnitTask[SeedInput, TensorOutput]):
    """Make the 4 KiB tensor and forward it."""

    default_descriptor = "BenchProduceExecutor"


class BenchConsume(UnitTask[ConsumeInput, SumOutput]):
    """Receive the forwarded tensor and return its sum."""

    default_descriptor = "BenchConsumeExecutor"


class BenchProduceSum(UnitTask[SeedInput, SumOutput]):
    """Make the tensor and sum it in one executor: the direct-call floor."""

    default_descriptor = "BenchProduceSumExecutor"


class BenchProduceExecutor(PythonExecutorDescriptor[BenchProduce]):
    handler: str = "produce"


class BenchConsumeExecutor(PythonExecutorDescriptor[BenchConsume]):
    handler: str = "consume"


class BenchProduceSumExecutor(PythonExecutorDescriptor[BenchProduceSum]):
    handler: str = "produce_sum"


async def produce(ctx: ExecutorContext, invocation: TaskInvocation) -> TensorOutput:
    inp, out = invocation.task_input, invocation.task_output
    assert isinstance(inp, SeedInput) and isinstance(out, TensorOutput)
    if not out.tensor.dst_sidecar_ranks:
        raise ValueError(f"forward {out.tensor.id} has no destination ranks; was the graph wired?")
    await ctx.sidecar.send(make_tensor(inp.seed), id=out.tensor.id, dst_ranks=out.tensor.dst_sidecar_ranks)
    return out


async def consume(ctx: ExecutorContext, invocation: TaskInvocation) -> SumOutput:
    inp = invocation.task_input
    assert isinstance(inp, ConsumeInput)
    x = await ctx.sidecar.recv(inp.x.id, copy=True)
    await ctx.sidecar.mark_done(inp.x.id, wait=False)  # a private copy: release without waiting
    return SumOutput(sum=float(x.sum()))


async def produce_sum(ctx: ExecutorContext, invocation: TaskInvocation) -> SumOutput:
    inp = invocation.task_input
    assert isinstance(inp, SeedInput)
    return SumOutput(sum=float(make_tensor(inp.seed).sum()))


# ----- app sources (registered through the gateway like a user's files) ---------------------------

PIPELINE_APP = """
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve.task import Task
from cornserve_tasklibs.dispatch_bench import (
    BenchConsume, BenchProduce, ConsumeInput, SeedInput, SumOutput,
)

class TwoStage(Task[SeedInput, SumOutput]):
    def post_init(self) -> None:
        self.produce = BenchProduce()
        self.consume = BenchConsume()

    def invoke(self, x: SeedInput) -> SumOutput:
        return self.consume.invoke(ConsumeInput(x=self.produce.invoke(x).tensor))

two_stage = TwoStage()

class Config(AppConfig):
    tasks = {"two_stage": two_stage}

class Request(BaseModel):
    seed: int

class Response(BaseModel):
    sum: float

async def serve(request: Request) -> Response:
    return Response(sum=(await two_stage(SeedInput(seed=request.seed))).sum)
"""

SINGLE_APP = """
from pydantic import BaseModel
from cornserve.app import AppConfig
from cornserve_tasklibs.dispatch_bench import BenchProduceSum, SeedInput

produce_sum = BenchProduceSum()

class Config(AppConfig):
    tasks = {"produce_sum": produce_sum}

class Request(BaseModel):
    seed: int

class Response(BaseModel):
    sum: float

async def serve(request: Request) -> Response:
    return Response(sum=(await produce_sum(SeedInput(seed=request.seed))).sum)
"""
