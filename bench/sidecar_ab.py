"""Benchmark: this checkout's sidecar against another checkout's, transfers alternating.

`bench/sidecar.py` times one version; comparing two versions with it means two runs minutes
apart, and on a small shared machine a 1 KiB send's median moves by 0.1 ms between such runs, more
than most changes to the control path. Here both versions run at once: sidecar servers from each
checkout's own `.venv` (ranks 0, 1 for this checkout, 2, 3 for the baseline, one node, one NATS
server), and for each version a producer and a consumer process started with that checkout's
interpreter, so client and server code are both the version's own. Transfer k of one version is
followed by transfer k of the other, the order alternating, so both see the same moment's load;
the per-transfer difference is the change.

    uv run --group bench python bench/sidecar_ab.py --baseline-checkout ../main --transfers 2000

Timing, as in `bench/sidecar.py`: a shared monotonic clock from just before the producer's
``send`` to the moment the consumer holds the value (a read-only tensor view, or the bytes of a
small object); the next transfer starts after the consumer's acknowledgement, which is not timed.
Prints each version's median and p99 per size, and the paired median of (this - baseline) with a
bootstrap 95% interval. Run it with the baseline being this checkout too (an A/A) to see how large a
difference one run can establish.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KiB = 1024
LINE_TIMEOUT_S = 300.0
"""Bound on a producer's answer (its start, or a block of transfers: each is bounded by its own timeouts)."""
SMALL_OBJECT_MAX = 64 * KiB
"""Up to this size a transfer is a ``bytes`` object (as the small rows of `bench/sidecar.py`);
bigger ones are float32 tensors."""


# ---------------------------------------------------------------- roles (any checkout's interpreter)
# Only the client API every version has (`Sidecar`, `send`, `recv`, `mark_done`): these run under
# the baseline's interpreter too.


def _payload(size: int) -> Any:
    if size <= SMALL_OBJECT_MAX:
        return os.urandom(size)
    import torch

    return torch.rand(size // 4, dtype=torch.float32)


async def producer_role(rank: int, dst: int, prefix: str, sizes: list[int]) -> None:
    """For each number on stdin run that many transfers back to back (each acknowledged before the
    next, as in `bench/sidecar.py`), then answer ``ok``."""
    from cornserve.sidecar import Sidecar

    payloads = {size: _payload(size) for size in set(sizes)}
    starts = []
    loop = asyncio.get_running_loop()
    async with Sidecar(rank) as sc:
        print("ready", flush=True)
        done = 0
        while done < len(sizes):
            count = int(await loop.run_in_executor(None, sys.stdin.readline))
            for k in range(done, min(done + count, len(sizes))):
                started = time.perf_counter()
                await sc.send(payloads[sizes[k]], f"{prefix}-{k}", [[dst]])
                starts.append(started)
                await sc.recv(f"{prefix}-ack-{k}", timeout=60)
                await sc.mark_done(f"{prefix}-ack-{k}")
            done = min(done + count, len(sizes))
            print("ok", flush=True)
    print(json.dumps(starts), flush=True)


async def consumer_role(rank: int, src: int, prefix: str, n: int) -> None:
    """Receive ``n`` transfers, note when each is in hand, acknowledge each to the producer."""
    from cornserve.sidecar import Sidecar

    ends = []
    async with Sidecar(rank) as sc:
        for k in range(n):
            item = await sc.recv(f"{prefix}-{k}", timeout=300)
            ends.append(time.perf_counter())
            assert item is not None
            del item
            await sc.mark_done(f"{prefix}-{k}")
            await sc.send(k, f"{prefix}-ack-{k}", [[src]])
    print(json.dumps(ends), flush=True)


# ---------------------------------------------------------------- the driver (this checkout)


class Version:
    """One checkout's producer and consumer processes, and the ranks of its two sidecars."""

    def __init__(
        self, label: str, python: str, ranks: tuple[int, int], sizes: list[int], env: dict[str, str]
    ) -> None:
        self.label = label
        prefix = f"ab-{label}-{time.monotonic_ns()}"
        src, dst = ranks
        script = str(Path(__file__).resolve())
        self.consumer = subprocess.Popen(
            [python, script, "consumer", str(dst), str(src), prefix, str(len(sizes))],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.producer = subprocess.Popen(
            [python, script, "producer", str(src), str(dst), prefix, ",".join(map(str, sizes))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._expect("ready")

    def _expect(self, word: str) -> None:
        """The producer's next line must be ``word``, within `LINE_TIMEOUT_S` (a hung version fails the run)."""
        assert self.producer.stdout is not None
        ready, _, _ = select.select([self.producer.stdout], [], [], LINE_TIMEOUT_S)
        if not ready:
            self.producer.kill()
            raise SystemExit(f"{self.label} producer said nothing within {LINE_TIMEOUT_S:g} s")
        line = self.producer.stdout.readline().strip()
        if line != word:
            raise SystemExit(
                f"{self.label} producer said {line!r}, not {word!r} (exit {self.producer.poll()})"
            )

    def run(self, count: int) -> None:
        """Run the next ``count`` transfers and wait until the last was acknowledged."""
        assert self.producer.stdin is not None
        self.producer.stdin.write(f"{count}\n")
        self.producer.stdin.flush()
        self._expect("ok")

    def times(self) -> list[float]:
        """Each transfer's latency (seconds), once every transfer ran."""
        out_p, _ = self.producer.communicate(timeout=120)
        out_c, _ = self.consumer.communicate(timeout=120)
        starts = json.loads(out_p.strip().splitlines()[-1])
        ends = json.loads(out_c.strip().splitlines()[-1])
        return [e - s for s, e in zip(starts, ends, strict=True)]


@dataclass
class Server:
    """One sidecar server to start: its rank and node, whose interpreter's `cornserve-sidecar`, its env."""

    rank: int
    node: str = "node-a"
    python: str = sys.executable
    env: dict[str, str] | None = None


def start_sidecars(
    url: str, work: Path, servers: list[Server], arena_bytes: int
) -> list[subprocess.Popen[bytes]]:
    """Start the servers with one peer secret (cross-node transfers need it), logs in ``work``."""
    secret = work / "sidecar-secret"
    secret.write_text(os.urandom(24).hex())
    secret.chmod(0o600)
    procs = []
    for server in servers:
        binary = str(Path(server.python).parent / "cornserve-sidecar")
        cmd = [binary, "--rank", str(server.rank), "--node", server.node, "--nats-url", url]
        cmd += ["--arena-bytes", str(arena_bytes), "--peer-secret-file", str(secret)]
        cmd.append("--prefault")  # commit the arena up front: no first-touch page faults inside timed sends
        log = open(work / f"sidecar-{server.rank}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server.env))
    return procs


def stop_sidecars(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the servers and wait for them (each removes its arena and socket at stop)."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


async def wait_sidecars(ranks: list[int], timeout_s: float = 60.0) -> None:
    from cornserve.sidecar import Sidecar

    for rank in ranks:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                async with Sidecar(rank, timeout=2) as sc:
                    await sc.info()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


def size_name(size: int) -> str:
    return f"{size // (KiB * KiB)} MiB" if size >= KiB * KiB else f"{size // KiB} KiB"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("producer", "consumer"):
        role, rank, peer, prefix, last = sys.argv[1:6]
        if role == "producer":
            asyncio.run(producer_role(int(rank), int(peer), prefix, [int(s) for s in last.split(",")]))
        else:
            asyncio.run(consumer_role(int(rank), int(peer), prefix, int(last)))
        return

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-checkout", required=True, help="the other checkout (with its .venv)")
    parser.add_argument("--transfers", type=int, default=2000, help="timed transfers per size and version")
    parser.add_argument("--warmup", type=int, default=50, help="untimed transfers per size and version first")
    parser.add_argument(
        "--block",
        type=int,
        default=20,
        help="transfers of one version back to back before the other's (default 20; 1 alternates every "
        "transfer, which times each one after the machine idled while the driver switched)",
    )
    parser.add_argument("--sizes-kib", default="1,1024", help="comma-separated sizes in KiB (default 1,1024)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paired import add_setting_options, bootstrap_median, with_settings

    add_setting_options(parser, "servers and clients (repeatable), e.g. CORNSERVE_EVENT_LOOP=uvloop")
    args = parser.parse_args()
    sizes = [int(s) * KiB for s in args.sizes_kib.split(",")]

    from cornserve.cli.natsserver import NatsServerProcess

    this_python = str(Path(sys.executable))
    base_python = str(Path(args.baseline_checkout).resolve() / ".venv" / "bin" / "python")
    if not Path(base_python).exists():
        raise SystemExit(f"{base_python} is missing: run `uv sync` in the baseline checkout first")
    pythons = {"this": this_python, "baseline": base_python}
    ranks = {"this": (0, 1), "baseline": (2, 3)}
    envs = {
        "this": with_settings(os.environ, "--this-env", args.this_env),
        "baseline": with_settings(os.environ, "--baseline-env", args.baseline_env),
    }
    # Each size's transfers in one block, warm-up first; both versions run the same sequence.
    sequence = [size for size in sizes for _ in range(args.warmup + args.transfers)]
    arena = max(64 * KiB * KiB, 8 * max(sizes))
    with NatsServerProcess() as nats_srv:
        os.environ["CORNSERVE_NATS_URL"] = nats_srv.url
        for env in envs.values():
            env["CORNSERVE_NATS_URL"] = nats_srv.url
        work = nats_srv.store_dir
        servers = [
            Server(rank, python=pythons[label], env=envs[label]) for label in pythons for rank in ranks[label]
        ]
        sidecars = start_sidecars(nats_srv.url, work, servers, arena)
        try:
            asyncio.run(wait_sidecars([0, 1, 2, 3]))
            versions = [
                Version(label, pythons[label], ranks[label], sequence, envs[label]) for label in pythons
            ]
            for n, start in enumerate(range(0, len(sequence), args.block)):
                for v in versions if n % 2 == 0 else versions[::-1]:
                    v.run(min(args.block, len(sequence) - start))
            times = {v.label: v.times() for v in versions}
        finally:
            stop_sidecars(sidecars)

    print(
        f"\nthis: {Path(__file__).resolve().parent.parent}  baseline: {Path(args.baseline_checkout).resolve()}"
    )
    for label, settings in (("this", args.this_env), ("baseline", args.baseline_env)):
        if settings:
            print(f"{label} with {' '.join(settings)}")
    print(f"{args.transfers} transfers per size and version after {args.warmup} untimed; ms\n")
    print(
        "| size | this p50 | baseline p50 | this p99 | baseline p99 | this - baseline, paired median [95% CI] |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for i, size in enumerate(sizes):
        lo = i * (args.warmup + args.transfers) + args.warmup
        hi = lo + args.transfers
        a = [t * 1e3 for t in times["this"][lo:hi]]
        b = [t * 1e3 for t in times["baseline"][lo:hi]]
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        low, high = bootstrap_median(diffs)
        p99 = [sorted(v)[min(len(v) - 1, int(len(v) * 0.99))] for v in (a, b)]
        print(
            f"| {size_name(size)} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | {p99[0]:.3f} | "
            f"{p99[1]:.3f} | {statistics.median(diffs):+.3f} [{low:+.3f}, {high:+.3f}] |"
        )


if __name__ == "__main__":
    main()
