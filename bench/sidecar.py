"""Benchmark: forward float32 tensors between two processes through the real sidecar.

Compares, in the same run, against (a) one in-process memcpy of the same bytes (the floor),
(b) pickle over a local TCP socket to another process, (c) Ray's object store put/get between
two processes. Also p50/p99 latency of a 1 KiB object, next to its floor: three bare process hops
over UNIX sockets with asyncio streams and no work (the path a same-node send took before direct
sends: client -> source server -> destination server -> waiting receiver). Same-node sends are
timed twice: as clients send by default (a copy for one same-node rank goes straight to that rank's
server: two hops) and with `direct_sends=False` (through the producer's own server: three hops).

Timing: a shared monotonic clock (time.perf_counter is CLOCK_MONOTONIC on Linux, identical in
every process) from just before the producer's send to the moment the consumer process holds
the value (for the sidecar: a zero-copy read-only tensor view; for pickle: the unpickled array;
for Ray: the zero-copy array from the object store). Trials are paced by an acknowledgement
that is not timed.

    uv run --group bench python bench/sidecar.py            # full run
    uv run --group bench python bench/sidecar.py --quick    # fewer repetitions, no Ray
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.runtime.eventloop import EventLoopChoice, loop_name, run_on_loop
from cornserve.runtime.process import free_port
from cornserve.sidecar import Sidecar

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidecar_ab import Server, consumer_role, start_sidecars, stop_sidecars, wait_sidecars

MiB = 1024 * 1024
SIZES = [(1 * MiB, 30), (16 * MiB, 15), (256 * MiB, 5)]
WARMUP = 2
SMALL_N = 400


@dataclass
class Row:
    method: str
    size: int
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def cells(self) -> tuple[str, str, str]:
        med = self.median
        return f"{med * 1e3:.3f}", f"{self.size / med / 1e9:.2f}", str(len(self.times))


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on the event loop executors run on (the standard loop unless CORNSERVE_EVENT_LOOP says
    otherwise): the sidecar clients here stand for executors, and the asyncio floor uses the same loop.
    """
    choice = os.environ.get("CORNSERVE_EVENT_LOOP", "auto")
    if choice not in ("auto", "uvloop", "asyncio"):
        raise SystemExit(f"CORNSERVE_EVENT_LOOP={choice!r}: use auto, uvloop or asyncio")
    run_on_loop(cast(EventLoopChoice, choice), main, auto_uvloop=False)


# ---------------------------------------------------------------- child roles


def pickle_server_role(port: int) -> None:
    """Receive length-prefixed pickles, unpickle, answer with the time the object was in hand."""
    srv = socket.create_server(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (n,) = struct.unpack("!Q", head)
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            got += conn.recv_into(view[got:], n - got)
        obj = pickle.loads(buf)
        end = time.perf_counter()
        del obj
        conn.sendall(struct.pack("!d", end))


# ---------------------------------------------------------------- measurements


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


async def round_trips(
    sc: Sidecar, dst_rank: int, prefix: str, n: int, send: Callable[[int, str], Awaitable[float]]
) -> list[float]:
    """Latency of ``n`` transfers to a consumer child on ``dst_rank``, each acknowledged before the next.

    ``send(k, id)`` sends transfer ``k`` and returns when its clock started; the child reports
    when each one arrived.
    """
    child = spawn("consumer", str(dst_rank), str(sc.rank), prefix, str(n))
    starts = []
    for k in range(n):
        starts.append(await send(k, f"{prefix}-{k}"))
        await sc.recv(f"{prefix}-ack-{k}", timeout=300)
        await sc.mark_done(f"{prefix}-ack-{k}")
    out_s, _ = child.communicate(timeout=600)
    ends = json.loads(out_s.strip().splitlines()[-1])
    return [e - s for s, e in zip(starts, ends, strict=True)]


async def bench_sidecar(
    sc: Sidecar, dst_rank: int, label: str, size: int, reps: int, zero_copy: bool = False
) -> Row:
    """Time one row; the producer client lives for the whole run, as an executor's would."""
    data = torch.rand(size // 4, dtype=torch.float32) if not zero_copy else None

    async def send(k: int, id_: str) -> float:
        value = data
        if value is None:
            value = await sc.alloc_tensor((size // 4,), torch.float32)
            value.fill_(float(k))  # the producer computes its output directly in the arena (not timed)
        started = time.perf_counter()
        await sc.send(value, id_, [[dst_rank]])
        return started

    prefix = f"{label}-{size}-{time.monotonic_ns()}"
    times = await round_trips(sc, dst_rank, prefix, reps + WARMUP, send)
    return Row(label, size, times[WARMUP:])


def bench_memcpy(size: int, reps: int) -> Row:
    src = torch.rand(size // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(reps + WARMUP):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return Row("memcpy (in-process, floor)", size, times[WARMUP:])


def raw_socket_server_role(port: int) -> None:
    """Receive length-prefixed bytes into one preallocated buffer; answer with the time they were in."""
    srv = socket.create_server(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        (n,) = struct.unpack("!Q", head)
        if len(buf) < n:
            buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            got += conn.recv_into(view[got:n], n - got)
        conn.sendall(struct.pack("!d", time.perf_counter()))


def bench_raw_socket(size: int, reps: int) -> Row:
    """The floor of any transfer across nodes: bytes over a loopback TCP socket, no encoding."""
    port = free_port()
    child = spawn("raw-server", str(port))
    conn = _connect_local(port)
    payload = memoryview(np.random.rand(size // 4).astype(np.float32)).cast("B")
    times = []
    for _ in range(reps + WARMUP):
        t0 = time.perf_counter()
        conn.sendall(struct.pack("!Q", size))
        conn.sendall(payload)
        (end,) = struct.unpack("!d", conn.recv(8, socket.MSG_WAITALL))
        times.append(end - t0)
    conn.close()
    child.wait(timeout=60)
    return Row("raw bytes over local TCP", size, times[WARMUP:])


def _connect_local(port: int) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


# ---------------------------------------------------------------- floor of a brokered small send

HOP_MSG = 1024


def hop_relay_role(listen: str, forward: str) -> None:
    """One hop of the floor: forward every 1 KiB message from ``listen`` to ``forward``, doing nothing else."""

    async def run() -> None:
        _, out = await asyncio.open_unix_connection(forward)

        async def serve(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
            # Until the previous process closes the connection at the end of the run.
            with contextlib.suppress(asyncio.IncompleteReadError):
                while True:
                    out.write(await reader.readexactly(HOP_MSG))

        async with await asyncio.start_unix_server(serve, listen):
            await asyncio.sleep(3600)

    run_loop(run())


def hop_sink_role(listen: str, ack: str) -> None:
    """The last process of the floor: note when each message is in hand, answer the producer directly."""

    async def run() -> None:
        _, back = await asyncio.open_unix_connection(ack)

        async def serve(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError):  # the run's end closes the connection
                while True:
                    await reader.readexactly(HOP_MSG)
                    back.write(struct.pack("!d", time.perf_counter()))

        async with await asyncio.start_unix_server(serve, listen):
            await asyncio.sleep(3600)

    run_loop(run())


def bench_hops(n: int, work_dir: Path) -> tuple[str, float, float]:
    """The floor under a same-node 1 KiB send: three process hops over UNIX sockets with asyncio streams.

    Producer -> relay -> relay -> sink, as a send crosses client -> source server -> destination
    server -> waiting receiver, with no work at all in between; the sink's answer is not timed.
    """
    paths = [str(work_dir / f"hop-{i}.sock") for i in range(3)]
    ack_path = str(work_dir / "hop-ack.sock")
    ack_srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ack_srv.bind(ack_path)
    ack_srv.listen(1)
    children = [spawn("hop-sink", paths[2], ack_path)]
    ack, _ = ack_srv.accept()
    for i in (1, 0):
        while not os.path.exists(paths[i + 1]):
            time.sleep(0.01)
        time.sleep(0.05)  # the next hop's server is listening once its socket file exists and binds
        children.append(spawn("hop-relay", paths[i], paths[i + 1]))
    while not os.path.exists(paths[0]):
        time.sleep(0.01)
    time.sleep(0.05)
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    first.connect(paths[0])
    payload = os.urandom(HOP_MSG)
    lat = []
    try:
        for _ in range(n + 20):
            t0 = time.perf_counter()
            first.sendall(payload)
            (end,) = struct.unpack("!d", ack.recv(8, socket.MSG_WAITALL))
            lat.append(end - t0)
    finally:
        first.close()
        ack.close()
        ack_srv.close()
        for c in children:
            c.kill()
            c.wait(timeout=30)
    lat = sorted(lat[20:])
    return (
        "floor: 3 bare asyncio UNIX-socket hops",
        lat[len(lat) // 2],
        lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    )


def bench_pickle(size: int, reps: int) -> Row:
    port = free_port()
    child = spawn("pickle-server", str(port))
    conn = _connect_local(port)
    arr = np.random.rand(size // 4).astype(np.float32)
    times = []
    for _ in range(reps + WARMUP):
        t0 = time.perf_counter()
        payload = pickle.dumps(arr, protocol=pickle.HIGHEST_PROTOCOL)
        conn.sendall(struct.pack("!Q", len(payload)))
        conn.sendall(payload)
        (end,) = struct.unpack("!d", conn.recv(8, socket.MSG_WAITALL))
        times.append(end - t0)
    conn.close()
    child.wait(timeout=60)
    return Row("pickle over local TCP", size, times[WARMUP:])


class RayBench:
    """Ray object store put/get between the driver and an actor process."""

    def __init__(self) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=2, object_store_memory=2 * 1024 * MiB, include_dashboard=False, log_to_driver=False)

        @ray.remote
        class Consumer:
            def take(self, arr: np.ndarray) -> float:
                # Ray resolved the ObjectRef argument: the array is in hand (zero-copy from plasma).
                assert arr.nbytes > 0
                return time.perf_counter()

        self.actor = Consumer.remote()  # type: ignore[attr-defined]
        ray.get(self.actor.take.remote(np.ones(1, dtype=np.float32)))

    def run(self, size: int, reps: int) -> Row:
        arr = np.random.rand(size // 4).astype(np.float32)
        times = []
        for _ in range(reps + WARMUP):
            t0 = time.perf_counter()
            ref = self.ray.put(arr)
            end = self.ray.get(self.actor.take.remote(ref))
            times.append(end - t0)
            del ref
        return Row("Ray object store put/get", size, times[WARMUP:])

    def close(self) -> None:
        self.ray.shutdown()


async def bench_small(sc: Sidecar, dst_rank: int, label: str, n: int) -> tuple[str, float, float]:
    payload = os.urandom(1024)

    async def send(k: int, id_: str) -> float:
        started = time.perf_counter()
        await sc.send(payload, id_, [[dst_rank]])
        return started

    prefix = f"small-{label}-{time.monotonic_ns()}"
    lat = (await round_trips(sc, dst_rank, prefix, n + 20, send))[20:]
    lat = sorted(lat)
    return label, lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


async def main_bench(skip_ray: bool, quick: bool, only_mib: list[int] | None, small_n: int | None) -> None:
    sizes = [(size, max(3, reps // 3)) for size, reps in SIZES] if quick else SIZES
    if only_mib is not None:
        sizes = [(size, reps) for size, reps in sizes if size // MiB in only_mib]
    small_n = small_n or (100 if quick else SMALL_N)
    print(f"event loop of the clients and the asyncio floor: {loop_name(asyncio.get_running_loop())}")
    rows: list[Row] = []
    ray_note = ""
    with NatsServerProcess() as nats_srv:
        os.environ["CORNSERVE_NATS_URL"] = nats_srv.url
        log_dir = nats_srv.store_dir
        servers = [Server(0), Server(1), Server(2, node="node-b")]
        sidecars = start_sidecars(nats_srv.url, log_dir, servers, 1200 * MiB)
        try:
            await wait_sidecars([0, 1, 2])
            async with Sidecar(0) as sc, Sidecar(0, direct_sends=False) as via_own:
                for size, reps in sizes:
                    print(f"size {size // MiB} MiB ...", file=sys.stderr, flush=True)
                    rows.append(bench_memcpy(size, reps))
                    rows.append(await bench_sidecar(sc, 1, "sidecar same node (shm)", size, reps))
                    rows.append(
                        await bench_sidecar(via_own, 1, "sidecar same node, via own server", size, reps)
                    )
                    rows.append(
                        await bench_sidecar(
                            sc, 1, "sidecar same node, alloc_tensor", size, reps, zero_copy=True
                        )
                    )
                    rows.append(await bench_sidecar(sc, 2, "sidecar across nodes (TCP)", size, reps))
                    rows.append(bench_raw_socket(size, reps))
                    rows.append(bench_pickle(size, reps))
                small = [
                    await bench_small(sc, 1, "same node (shm)", small_n),
                    await bench_small(via_own, 1, "same node, via own server", small_n),
                    await bench_small(sc, 2, "across nodes (TCP)", small_n),
                    bench_hops(small_n, log_dir),
                ]
            # Ray last: its daemons keep polling and would steal the 2 cores from the other rows.
            if skip_ray:
                ray_note = "Ray skipped (--skip-ray)"
            else:
                try:
                    ray_bench = RayBench()
                except Exception as exc:  # reported in the table, never hidden
                    ray_note = f"Ray could not be started: {type(exc).__name__}: {exc}"
                else:
                    for size, reps in sizes:
                        print(f"ray {size // MiB} MiB ...", file=sys.stderr, flush=True)
                        rows.append(ray_bench.run(size, reps))
                    ray_bench.close()
        finally:
            stop_sidecars(sidecars)

    print(
        f"\nHost: {os.cpu_count()} CPUs, torch {torch.__version__}, torch threads {torch.get_num_threads()}\n"
    )
    print("| size | method | median ms | GB/s | x memcpy | reps |")
    print("|---:|---|---:|---:|---:|---:|")
    for size, _ in sizes:
        floor = next(r for r in rows if r.size == size and r.method.startswith("memcpy")).median
        for r in (r for r in rows if r.size == size):
            ms, gbs, n = r.cells()
            print(f"| {size // MiB} MiB | {r.method} | {ms} | {gbs} | {r.median / floor:.2f} | {n} |")
    if ray_note:
        print(f"\n{ray_note}")
    print("\n| 1 KiB object | p50 ms | p99 ms | n |")
    print("|---|---:|---:|---:|")
    for label, p50, p99 in small:
        name = label if label.startswith("floor") else f"sidecar {label}"
        print(f"| {name} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {small_n} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "consumer":
        rank, ack, prefix, n = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        run_loop(consumer_role(rank, ack, prefix, n))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "raw-server":
        raw_socket_server_role(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "hop-relay":
        hop_relay_role(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "hop-sink":
        hop_sink_role(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "pickle-server":
        pickle_server_role(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="a third of the repetitions, 100 small objects, no Ray"
    )
    parser.add_argument("--sizes", help="comma-separated MiB sizes to run (of 1,16,256; none: 0)")
    parser.add_argument("--small-n", type=int, help="1 KiB objects timed (default 400, --quick 100)")
    args = parser.parse_args()
    only = None if args.sizes is None else [int(x) for x in args.sizes.split(",") if x]
    run_loop(main_bench(args.skip_ray or args.quick, args.quick, only, args.small_n))


if __name__ == "__main__":
    main()
