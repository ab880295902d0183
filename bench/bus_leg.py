"""Benchmark: the gateway <-> dispatcher leg alone, NATS request/reply against a direct framed socket.

Why: every graph crosses this leg twice (the graph out, the reply back), and each crossing goes
through nats-server: four process-to-process messages of a two-stage request's fourteen. Taking
nats-server off the leg (a connection from the gateway straight to a replica) is the one
structural change on the dispatch path that earlier sessions left out as too large to attempt
blind. This bench measures what it could gain before anything is built: the same two processes
exchange the same bytes both ways, and only the transport differs.

- **NATS**: a "dispatcher" process serves a queue-group subscription with nats-py (one callback,
  `msg.respond`), as `cornserve.dispatcher.service` does through `nats.micro`; a "gateway" process
  subscribes once to a wildcard inbox and publishes each request with a reply subject under it
  (what `cornserve.gateway.inbox_mux` does), matching replies by the subject's token.
- **Direct**: the same "dispatcher" process also listens on a loopback TCP port; the "gateway"
  keeps one connection and sends each request as a frame of `cornserve.bus.invoke_channel` (what
  the dispatcher already uses towards executors), matching replies by the frame's request id.

Both run on the control plane's event loop (`cornserve.runtime.eventloop`, `auto`: uvloop when
installed). The transports take turns in blocks (`--block` requests each, the order alternating),
so a moving machine load moves both. Reported per transport: p50 and p99 of a round trip at
concurrency 1, requests per second at `--concurrency N`, and at both concurrencies the CPU per
round trip of each of the three processes (gateway, dispatcher, nats-server; user + system from
/proc, summed over all blocks: one block is too short for /proc's clock ticks), then the paired
medians over blocks of the p50 difference and the rate ratio.

    uv run --group bench python bench/bus_leg.py [--requests 4000] [--concurrency 32] [--request-bytes 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.aio.msg import Msg

from cornserve.bus import invoke_channel as wire
from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.eventloop import run_on_loop
from cornserve.runtime.process import free_port

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from dispatch_cpu import cpu_seconds  # noqa: E402
from paired import bootstrap_median  # noqa: E402

SUBJECT = "bench.leg.invoke"
QUEUE = "bench-leg"
REPLY = json.dumps({"request_id": "r" * 32, "outputs": [None, {"sum": 523776.0}]}).encode()
TIMEOUT_S = 10.0
"""Deadline of one round trip."""
READY_TIMEOUT_S = 60.0
"""Deadline for the dispatcher stand-in to connect and listen."""


# ----- the "dispatcher" ----------------------------------------------------------------------------


class FrameServer(wire.ChannelProtocol):
    """Answers every call frame with REPLY's bytes (what the NATS handler answers)."""

    def __init__(self) -> None:
        super().__init__()
        self._reader = wire.FrameReader()

    def data_received(self, data: bytes) -> None:
        """Reply to each complete call."""
        assert self._transport is not None
        out = [wire.encode(wire.REPLY, frame.request_id, b"", REPLY) for frame in self._reader.feed(data)]
        if out:
            self._transport.write(b"".join(out))


async def serve(nats_url: str, port: int) -> None:
    """Serve both transports until stdin closes."""
    nc = await nats.connect(nats_url)

    async def on_msg(msg: Msg) -> None:
        await msg.respond(REPLY)

    await nc.subscribe(SUBJECT, queue=QUEUE, cb=on_msg)
    await nc.flush()
    server = await asyncio.get_running_loop().create_server(FrameServer, "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()
    await nc.close()


# ----- the "gateway" -------------------------------------------------------------------------------


class NatsCaller:
    """Requests over NATS through one wildcard inbox subscription (the gateway's `InboxMux`)."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.counter = 0

    async def start(self) -> None:
        async def on_reply(msg: Msg) -> None:
            future = self.waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
            if future is not None and not future.done():
                future.set_result(msg.data)

        await self.nc.subscribe(f"{self.prefix}.*", cb=on_reply)
        await self.nc.flush()

    async def call(self, body: bytes) -> bytes:
        self.counter += 1
        token = str(self.counter)
        future = asyncio.get_running_loop().create_future()
        self.waiting[token] = future
        await self.nc.publish(SUBJECT, body, reply=f"{self.prefix}.{token}")
        async with asyncio.timeout(TIMEOUT_S):
            return await future


class DirectCaller(wire.ChannelProtocol):
    """Requests as call frames on one connection, replies matched by request id."""

    def __init__(self) -> None:
        super().__init__()
        self._reader = wire.FrameReader()
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.counter = 0

    def data_received(self, data: bytes) -> None:
        """Hand each reply to its caller."""
        for frame in self._reader.feed(data):
            future = self.waiting.pop(frame.request_id, None)
            if future is not None and not future.done():
                future.set_result(frame.body)

    async def call(self, body: bytes) -> bytes:
        assert self._transport is not None
        self.counter += 1
        future = asyncio.get_running_loop().create_future()
        self.waiting[self.counter] = future
        self._transport.write(wire.encode(wire.CALL, self.counter, b"", body))
        async with asyncio.timeout(TIMEOUT_S):
            return await future


async def run_block(
    caller: Callable[[bytes], Awaitable[bytes]], body: bytes, n: int, concurrency: int
) -> tuple[list[float], float]:
    """`n` calls, `concurrency` at a time: (each call's seconds, the block's wall seconds)."""
    times: list[float] = []
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            reply = await caller(body)
            times.append(time.perf_counter() - t0)
            assert reply == REPLY, "a wrong reply"

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times, time.perf_counter() - t0


def add(total: dict[str, float], spent: dict[str, float]) -> None:
    """Add one block's CPU seconds per process to a running total."""
    for who, seconds in spent.items():
        total[who] += seconds


async def drive(args: argparse.Namespace, pids: dict[str, int]) -> None:
    """The gateway: alternate blocks of both transports, at concurrency 1 and at `--concurrency`."""
    nc = await nats.connect(args.nats_url)
    via_nats = NatsCaller(nc)
    await via_nats.start()
    _, direct = await asyncio.get_running_loop().create_connection(DirectCaller, "127.0.0.1", args.port)
    callers: dict[str, Callable[[bytes], Awaitable[bytes]]] = {"nats": via_nats.call, "direct": direct.call}
    body = json.dumps({"invocations": "x" * max(args.request_bytes - 20, 0)}).encode()
    pids = {**pids, "gateway": os.getpid()}
    for caller in callers.values():  # warm-up
        await run_block(caller, body, 200, args.concurrency)
    blocks = max(args.requests // args.block, 1)
    latency: dict[str, list[list[float]]] = {name: [] for name in callers}
    rate: dict[str, list[float]] = {name: [] for name in callers}
    cpu1: dict[str, dict[str, float]] = {name: dict.fromkeys(pids, 0.0) for name in callers}
    """CPU seconds per process over every concurrency-1 block of a transport."""
    cpu: dict[str, dict[str, float]] = {name: dict.fromkeys(pids, 0.0) for name in callers}
    """The same over the blocks at `--concurrency`."""
    for block in range(blocks):
        order = list(callers) if block % 2 == 0 else list(reversed(callers))
        for concurrency in (1, args.concurrency):
            for name in order:
                before = {who: cpu_seconds(pid) for who, pid in pids.items()}
                times, wall = await run_block(callers[name], body, args.block, concurrency)
                after = {who: cpu_seconds(pid) for who, pid in pids.items()}
                spent = {who: after[who] - before[who] for who in pids}
                if concurrency == 1:
                    latency[name].append(times)
                    add(cpu1[name], spent)
                else:
                    rate[name].append(args.block / wall)
                    add(cpu[name], spent)
    await nc.close()
    report(args, latency, rate, cpu1, cpu, list(pids))


def report(
    args: argparse.Namespace,
    latency: dict[str, list[list[float]]],
    rate: dict[str, list[float]],
    cpu1: dict[str, dict[str, float]],
    cpu: dict[str, dict[str, float]],
    who: list[str],
) -> None:
    """Print each transport's figures, then the paired differences (direct against NATS).

    CPU is the total over all of a transport's blocks divided by their requests (/proc counts in
    clock ticks, too coarse for one block).
    """
    blocks = len(rate["nats"])
    requests = blocks * args.block
    print(
        f"\n{blocks} blocks of {args.block} requests per transport and concurrency; request "
        f"{args.request_bytes} B, reply {len(REPLY)} B\n"
    )
    names = " | ".join(who)
    print(
        f"| transport | p50 ms (c=1) | p99 ms (c=1) | CPU ms/request at c=1: {names} | total "
        f"| req/s (c={args.concurrency}) | CPU ms/request at c={args.concurrency}: {names} | total |"
    )
    print("|---|---:|---:|" + "---:|" * (len(who) + 2) + "---:|" * (len(who) + 1))
    for name in rate:
        flat = sorted(t for block in latency[name] for t in block)
        p50, p99 = flat[len(flat) // 2] * 1000, flat[int(len(flat) * 0.99)] * 1000
        at1 = " | ".join(f"{cpu1[name][w] * 1000 / requests:.3f}" for w in who)
        atn = " | ".join(f"{cpu[name][w] * 1000 / requests:.3f}" for w in who)
        total1 = sum(cpu1[name].values()) * 1000 / requests
        totaln = sum(cpu[name].values()) * 1000 / requests
        print(
            f"| {name} | {p50:.3f} | {p99:.3f} | {at1} | {total1:.3f} | {statistics.median(rate[name]):.0f} "
            f"| {atn} | {totaln:.3f} |"
        )
    p50_diff = [
        (statistics.median(d) - statistics.median(n)) * 1000
        for d, n in zip(latency["direct"], latency["nats"], strict=True)
    ]
    ratio = [d / n for d, n in zip(rate["direct"], rate["nats"], strict=True)]
    print("\npaired medians over blocks [95% interval], direct against NATS:")
    for label, values, unit in (
        ("p50 at c=1, direct - NATS", p50_diff, " ms"),
        (f"req/s at c={args.concurrency}, direct / NATS", ratio, "x"),
    ):
        low, high = bootstrap_median(values)
        print(f"  {label}: {statistics.median(values):+.3f}{unit} [{low:+.3f}, {high:+.3f}]")


def main() -> None:
    """Start nats-server and the two processes; the driver prints the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4000, help="requests per transport and concurrency")
    parser.add_argument("--block", type=int, default=200, help="requests per block (the unit of pairing)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--request-bytes", type=int, default=1500, help="size of each request body")
    parser.add_argument("--role", choices=["main", "serve", "drive"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--nats-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.block < args.concurrency:
        raise SystemExit("--block must be at least --concurrency")
    if args.role == "serve":
        run_on_loop("auto", serve(args.nats_url, args.port))
        return
    if args.role == "drive":
        run_on_loop("auto", drive(args, json.loads(args.pids)))
        return
    nats_server = NatsServerProcess()
    nats_server.start()
    port = free_port()
    script = [sys.executable, __file__]
    server = subprocess.Popen(
        [*script, "--role", "serve", "--nats-url", nats_server.url, "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        readable, _, _ = select.select([server.stdout], [], [], READY_TIMEOUT_S)
        if not readable or server.stdout.readline().strip() != "ready":
            raise SystemExit(f"the dispatcher stand-in did not start within {READY_TIMEOUT_S:g} s")
        assert nats_server.pid is not None
        pids = json.dumps({"dispatcher": server.pid, "nats-server": nats_server.pid})
        forwarded = [
            f"--requests={args.requests}",
            f"--block={args.block}",
            f"--concurrency={args.concurrency}",
            f"--request-bytes={args.request_bytes}",
        ]
        subprocess.run(
            [
                *script,
                "--role",
                "drive",
                "--nats-url",
                nats_server.url,
                "--port",
                str(port),
                "--pids",
                pids,
                *forwarded,
            ],
            check=True,
            timeout=1800,
        )
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=30)
        nats_server.stop()


if __name__ == "__main__":
    main()
