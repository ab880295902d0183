"""The offline GPU proof of issue 17, run by bench/gpu_check.sh on the GPU machine; prints one table.

usage: python bench/gpu_check.py preflight        exit 3, saying why, without CUDA, a GPU or CuPy >= 14
       python bench/gpu_check.py run [--budget S]  every stage below, then the table (exit 1 if a row failed)
       python bench/gpu_check.py producer ...      internal: the bandwidth run's producer process

Stages (each one a row or more of the table):
  - the machine: GPU, driver-side CUDA, torch, CuPy, NCCL versions;
  - tests/sidecar/test_gpu.py -m gpu: CUDA IPC between two processes (a slice at a non-zero offset
    written on a busy side stream and sent with the sync API, overwritten after send: bit-identical
    on arrival), a send to one's own rank, NCCL send-to-self inside one group call with the unique
    id through its wire form, and the clean error for two ranks on one GPU across "nodes";
  - bandwidth: a CUDA tensor sent through two sidecars on one node to another process (stage copy,
    IPC export, control messages, open, device copy) against a plain device memcpy of the same size;
  - models (bench/gpu_models.py): a tiny Qwen2-VL's greedy tokens on cuda:0 equal the CPU's, with
    fission off (full model) and on (Eric's encoder on cuda:0 in another process, its embedding
    sent through the sidecar as a CUDA tensor, the language model on cuda:0);
  - Eric's tests with the GPU visible (Eric picks cuda:0): its embeddings against the full model's;
  - the LLM executor with --device cuda:0: greedy tokens with fission on (embeddings sent through
    the sidecar as CUDA tensors: device to device) and off, against transformers on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
NO_GPU_EXIT = 3


@dataclass
class Row:
    check: str
    result: str  # PASS / FAIL / SKIP / INFO / MISSING
    detail: str


def preflight() -> int:
    """Say why this machine cannot run the check (exit 3), or print what it has (exit 0)."""
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not importable here; run on the GPU machine", file=sys.stderr)
        return NO_GPU_EXIT
    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "nothing to check here: run bench/gpu_check.sh on the GPU machine",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    try:
        import cupy
    except ImportError:
        print("gpu_check: CuPy is not installed (needs cupy-cuda13x >= 14.2)", file=sys.stderr)
        return NO_GPU_EXIT
    if int(cupy.__version__.split(".")[0]) < 14:
        print(f"gpu_check: CuPy {cupy.__version__} is older than 14", file=sys.stderr)
        return NO_GPU_EXIT
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CuPy {cupy.__version__}")
    return 0


def machine_row() -> Row:
    import cupy
    import torch
    from cupy.cuda import nccl, runtime

    driver = runtime.driverGetVersion()
    detail = (
        f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}; driver CUDA {driver // 1000}.{driver % 1000 // 10}; "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}); CuPy {cupy.__version__}; NCCL {nccl.get_version()}; "
        f"Python {sys.version.split()[0]}"
    )
    return Row("machine", "INFO", detail)


def pytest_rows(
    label: str, args: list[str], out: Path, timeout: float, env: dict[str, str] | None = None
) -> list[Row]:
    """Run pytest (with ``env`` added to the environment) and turn its junit report into one row per test."""
    xml = out / f"{label}.xml"
    log = out / f"{label}.log"
    # `-W default`: the GPU machine's torch/transformers are other versions than the lock's; their
    # deprecation warnings are shown, not turned into failures as the project's own runs do.
    cmd = [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-q", "-W", "default"]
    cmd.append(f"--junitxml={xml}")
    try:
        with log.open("w") as f:
            subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env={**os.environ, **(env or {})},
            )
    except subprocess.TimeoutExpired:
        return [Row(label, "FAIL", f"pytest ran past {timeout:.0f}s (log: {log})")]
    if not xml.exists():
        return [Row(label, "FAIL", f"pytest wrote no report (log: {log})")]
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "?")
        seconds = float(case.get("time", "0"))
        problem = next(iter(case.findall("failure") + case.findall("error")), None)
        skipped = case.find("skipped")
        if problem is not None:
            first = (problem.get("message") or "").splitlines()[:1]
            rows.append(Row(f"{label}: {name}", "FAIL", (first[0] if first else "failed")[:160]))
        elif skipped is not None:
            rows.append(Row(f"{label}: {name}", "SKIP", (skipped.get("message") or "")[:160]))
        else:
            rows.append(Row(f"{label}: {name}", "PASS", f"{seconds:.1f}s"))
    return rows or [Row(label, "FAIL", f"no test ran (log: {log})")]


# ---------------------------------------------------------------------- bandwidth


def producer(rank: int, dst: int, prefix: str, size: int, n: int) -> None:
    """Send ``n`` CUDA tensors of ``size`` bytes with the sync API, each followed by its start time."""
    import torch

    from cornserve.sidecar import Sidecar

    sc = Sidecar(rank).connect_sync()
    try:
        gen = torch.Generator(device="cuda").manual_seed(7)
        t = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda", generator=gen)
        torch.cuda.synchronize()
        for i in range(n):
            started = time.monotonic()  # system-wide on Linux: comparable in the consumer
            sc.send_sync(t, f"{prefix}-{i}", [[dst]])
            sc.send_sync(started, f"{prefix}-{i}-t0", [[dst]])
        assert sc.recv_sync(f"{prefix}-ack", timeout=300) == "done"
        sc.mark_done_sync(f"{prefix}-ack")
    finally:
        sc.close_sync()


def memcpy_gbps(size: int, reps: int) -> float:
    import torch

    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return size / statistics.median(times) / 1e9


async def ipc_bandwidth(sizes: list[tuple[int, int]], out: Path) -> list[Row]:
    import torch
    from tests.support.sidecars import start_sidecars

    from cornserve.cli.natsserver import NatsServerProcess
    from cornserve.sidecar import Sidecar

    rows = []
    with NatsServerProcess() as nats_srv:
        os.environ["CORNSERVE_NATS_URL"] = nats_srv.url
        servers = await start_sidecars([0, 1], nats_srv.url, out, arena_bytes=64 * MiB)
        try:
            async with Sidecar(1, timeout=120) as dst:
                for size, n in sizes:
                    prefix = f"bw-{size}"
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "producer", "0", "1", prefix, str(size), str(n)], cwd=ROOT
                    )
                    gen = torch.Generator(device="cuda").manual_seed(7)
                    expected = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda", generator=gen)
                    times, identical = [], True
                    for i in range(n):
                        got = await dst.recv(f"{prefix}-{i}", timeout=120)
                        copy = got.clone()  # the consumer's own device copy of the producer's bytes
                        torch.cuda.synchronize()
                        done = time.monotonic()
                        started = await dst.recv(f"{prefix}-{i}-t0", timeout=60)
                        identical = identical and got.is_cuda and torch.equal(copy, expected)
                        del got
                        await dst.mark_done(f"{prefix}-{i}")
                        await dst.mark_done(f"{prefix}-{i}-t0")
                        times.append(done - started)
                    await dst.send("done", f"{prefix}-ack", [[0]])
                    rc = await asyncio.to_thread(proc.wait, 300)
                    warm = times[1:] or times
                    gbps = size / statistics.median(warm) / 1e9
                    base = memcpy_gbps(size, 10)
                    ok = identical and rc == 0
                    rows.append(
                        Row(
                            f"CUDA IPC send->recv->copy, {size // MiB} MiB (median of {len(warm)})",
                            "PASS" if ok else "FAIL",
                            f"{gbps:.1f} GB/s end to end ({statistics.median(warm) * 1e3:.2f} ms) vs device "
                            f"memcpy {base:.0f} GB/s; bit-identical: {identical}; producer exit {rc}",
                        )
                    )
        finally:
            for s in servers:
                s.stop()
    return rows


# ---------------------------------------------------------------------- models


def models_rows(out: Path, timeout: float) -> list[Row]:
    """bench/gpu_models.py: greedy tokens on cuda:0 against the CPU, fission off and on."""
    log = out.with_suffix(".log")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "bench/gpu_models.py"), "check", str(out)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [Row("models on cuda:0", "FAIL", f"ran past {timeout:.0f}s")]
    log.write_text(done.stdout + done.stderr)
    rows = [Row(*line.split("\t")[1:4]) for line in done.stdout.splitlines() if line.startswith("ROW\t")]
    if done.returncode != 0 or not rows:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append(Row("models on cuda:0", "FAIL", f"exit {done.returncode}: {tail[:160]} (log: {log})"))
    return rows


# ---------------------------------------------------------------------- the run


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    print()
    print(f"| {'check'.ljust(width)} | result | detail |")
    print(f"|{'-' * (width + 2)}|--------|--------|")
    for r in rows:
        print(f"| {r.check.ljust(width)} | {r.result:<6} | {r.detail} |")


def run(budget: float, out: Path) -> int:
    deadline = time.monotonic() + budget
    out.mkdir(parents=True, exist_ok=True)
    rows = [machine_row()]

    def left(share: float) -> float:
        return max(30.0, (deadline - time.monotonic()) * share)

    rows += pytest_rows("sidecar GPU tests", ["tests/sidecar/test_gpu.py", "-m", "gpu"], out, left(0.4))
    try:
        sizes = [(64 * MiB, 6), (1024 * MiB, 4)]
        rows += asyncio.run(asyncio.wait_for(ipc_bandwidth(sizes, out), left(0.25)))
    except Exception as exc:
        rows.append(Row("CUDA IPC bandwidth", "FAIL", f"{type(exc).__name__}: {exc}"[:200]))
    rows += models_rows(out / "models", left(0.3))
    rows += pytest_rows(
        "Eric on cuda:0 (auto) vs the full model",
        ["tests/eric/test_eric.py", "-k", "matches_full_model"],
        out,
        left(0.4),
    )
    # The LLM executors under test run with --device cuda:0 and the test sends the fission
    # embeddings as CUDA tensors (tests/llm_executor/support.py TEST_DEVICE); the reference is the CPU.
    rows += pytest_rows(
        "LLM executor on cuda:0, fission on/off vs CPU transformers",
        ["tests/llm_executor/test_llm_executor.py", "-k", "greedy_matches_transformers"],
        out,
        left(0.95),
        env={"CORNSERVE_TEST_LLM_DEVICE": "cuda:0"},
    )
    print_table(rows)
    failed = [r for r in rows if r.result == "FAIL"]
    print(f"\ngpu_check: {len(rows)} rows, {len(failed)} failed; logs in {out}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("preflight")
    r = sub.add_parser("run")
    r.add_argument("--budget", type=float, default=540.0, help="seconds for every stage together")
    r.add_argument("--out", type=Path, default=Path("/tmp/cornserve-gpu-check"))
    p = sub.add_parser("producer")
    for name in ("rank", "dst", "prefix", "size", "n"):
        p.add_argument(name)
    args = parser.parse_args()
    if args.cmd == "preflight":
        sys.exit(preflight())
    if args.cmd == "producer":
        producer(int(args.rank), int(args.dst), args.prefix, int(args.size), int(args.n))
        return
    code = preflight()
    if code:
        sys.exit(code)
    sys.path.insert(0, str(ROOT))  # tests.support (sidecar start-up helpers)
    sys.exit(run(args.budget, args.out))


if __name__ == "__main__":
    main()
