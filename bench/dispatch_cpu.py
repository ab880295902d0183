"""Where a dispatch-benchmark request's CPU goes: CPU time per request of every cluster process.

Starts the same cluster as `bench/dispatch.py` (`LocalCluster`, the `dispatch-bench` task library,
the two-stage and one-stage apps), warms up, then for each app sends `--requests` requests with
`--concurrency` in flight and reads every process's CPU time (user + system, from /proc) before
and after: the table is CPU milliseconds per request by process, and how much of it the kernel
accounted as system time (the sum is what one request costs the machine; on a CPU-bound host its
inverse bounds the throughput). With `--py-spy DIR` it also records a py-spy profile (raw
collapsed stacks, `--nonblocking`; `--py-spy-gil` adds `--gil`) of the gateway, the dispatchers
and the executors during the throughput phase of each app, one file per process.

    uv run --group bench python bench/dispatch_cpu.py [--requests 2000] [--py-spy /tmp/prof]

Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from dispatch import ONE_STAGE_APP, TWO_STAGE_APP, Target, run_concurrent, set_up_apps  # noqa: E402

from cornserve.cli.launcher import LocalCluster  # noqa: E402
from cornserve.client import CornserveClient  # noqa: E402
from cornserve.runtime.process import free_port  # noqa: E402

logger = logging.getLogger("bench.dispatch_cpu")

TICKS = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of `root`: pid → a short name from its command line."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        names[int(entry)] = " ".join(a.decode(errors="replace") for a in argv if a)
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = short_name(names[pid].split(" "))
                frontier.append(pid)
    return found


def short_name(argv: list[str]) -> str:
    """`cornserve.gateway.main` → gateway, a sidecar with its rank, an executor with its task."""
    text = " ".join(argv)
    if "nats-server" in text:
        return "nats-server"
    for flag in ("--replica-id", "--rank", "--task-key"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            value = argv[argv.index(flag) + 1]
            module = next((a for a in argv if a.startswith("cornserve.")), "cornserve.?")
            return f"{module.split('.')[1]}[{value[:40]}]"
    module = next((a for a in argv if a.startswith("cornserve.")), None)
    if module is not None:
        return module.removesuffix(".main").removesuffix(".server")
    return os.path.basename(argv[0]) if argv else "?"


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of `pid` so far, in seconds (0, 0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (0 if it is gone)."""
    return sum(cpu_times(pid))


async def executor_names(client: CornserveClient) -> dict[int, str]:
    """Executor pid → its task's class name (GET /tasks)."""
    names: dict[int, str] = {}
    for deployment in (await client.list_tasks()).tasks:
        for executor in deployment.executors:
            if executor.pid is not None:
                names[executor.pid] = f"executor[{deployment.task}]"
    return names


def start_py_spy(
    pids: dict[int, str], out_dir: Path, label: str, seconds: int, gil: bool = False
) -> list[subprocess.Popen[bytes]]:
    """One `py-spy record` per process for `seconds` (raw collapsed stacks); `gil`: only samples
    taken while a thread holds the GIL (time blocked in a call that releases it is left out)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = []
    for pid, name in pids.items():
        path = out_dir / f"{label}-{name.replace('[', '_').replace(']', '')}-{pid}.txt"
        procs.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    *(["--gil"] if gil else []),
                    "--nonblocking",
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "-d",
                    str(seconds),
                    "-p",
                    str(pid),
                    "-o",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    return procs


async def phase(
    url: str,
    token: str,
    app: str,
    args: argparse.Namespace,
    names: dict[int, str],
) -> None:
    """Warm up, then measure CPU per request of every process over `--requests` requests."""
    target = Target(
        app, f"{url}/apps/{app}/invoke", lambda seed: {"seed": seed}, {"Authorization": f"Bearer {token}"}
    )
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        errors: list[str] = []
        await run_concurrent(http, target, range(10_000, 10_000 + args.warmup), args.concurrency, errors)
        spies = []
        if args.py_spy is not None:
            watched = {
                p: n
                for p, n in names.items()
                if n.startswith(("cornserve.gateway", "dispatcher", "executor"))
            }
            spies = start_py_spy(watched, args.py_spy, app, args.py_spy_seconds, args.py_spy_gil)
            await asyncio.sleep(1.0)  # py-spy attaches
        before = {pid: cpu_times(pid) for pid in names}
        own_before = time.process_time()
        start = time.perf_counter()
        ok = await run_concurrent(http, target, range(args.requests), args.concurrency, errors)
        wall = time.perf_counter() - start
        own = time.process_time() - own_before
        after = {pid: cpu_times(pid) for pid in names}
        for spy in spies:
            spy.wait(timeout=args.py_spy_seconds + 60)
    scale = 1e3 / max(ok, 1)
    user = {pid: (after[pid][0] - before[pid][0]) * scale for pid in names}
    system = {pid: (after[pid][1] - before[pid][1]) * scale for pid in names}
    print(f"\n{app}: {ok} ok, {len(errors)} error(s), {ok / wall:.1f} req/s at c={args.concurrency}")
    print("| process | CPU ms per request | of which system |")
    print("|---|---:|---:|")
    for pid in sorted(names, key=lambda p: -(user[p] + system[p])):
        if user[pid] + system[pid] >= 0.005:
            print(f"| {names[pid]} | {user[pid] + system[pid]:.3f} | {system[pid]:.3f} |")
    print(f"| benchmark client | {own * scale:.3f} | |")
    total_system = sum(system.values())
    print(f"| **total (cluster)** | **{sum(user.values()) + total_system:.3f}** | **{total_system:.3f}** |")
    for message in errors[:5]:
        print("  error:", message)


async def drive(url: str, token: str, args: argparse.Namespace) -> None:
    async with CornserveClient(url, timeout_s=600, token=token) as client:
        await set_up_apps(client, [TWO_STAGE_APP, ONE_STAGE_APP])
        executors = await executor_names(client)
    names = descendants(os.getpid())
    names.update({pid: name for pid, name in executors.items() if pid in names})
    for app in args.apps:
        await phase(url, token, app, args, names)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--apps", nargs="+", default=[TWO_STAGE_APP, ONE_STAGE_APP])
    parser.add_argument("--py-spy", type=Path, default=None, help="directory for py-spy profiles")
    parser.add_argument("--py-spy-seconds", type=int, default=8)
    parser.add_argument(
        "--py-spy-gil", action="store_true", help="profile only while the GIL is held (py-spy --gil)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="cornserve-bench-cpu-"))
    cluster = LocalCluster(state_dir=work_dir / "cornserve", port=free_port(), say=lambda *a: None)
    try:
        cluster.start(ready_timeout_s=300)
        asyncio.run(drive(cluster.url, cluster.admin_token, args))
    finally:
        cluster.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
