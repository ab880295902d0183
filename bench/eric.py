"""Benchmark: one image through Eric (HTTP in, embedding out through the sidecar) vs in-process.

Eric runs as a real process on one CPU torch thread (`OMP_NUM_THREADS=1`, as on one CPU slot), with
real sidecar servers for its rank and the receiver's. Requests go one at a time, 50 ms apart (as at
a low arrival rate), each timed from the POST until this process holds both chunks of the
embedding (tensor and metadata). In the same run, alternating with each request, the same image goes
through the same work in this process on one torch thread (fetch and decode the `data:` URL,
preprocess, encode, cast to the LLM's dtype): the floor. `--baseline-checkout DIR` also starts an
Eric from another checkout's virtual environment (`DIR/.venv`), alternating with this one: a
paired before/after comparison of a change to Eric.

    uv run --group bench python bench/eric.py
    uv run --group bench python bench/eric.py --baseline-checkout ../main --requests 150
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import torch

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.models.encoders import load_encoder
from cornserve.models.media import load_media
from cornserve.models.media_policy import MediaPolicy
from cornserve.models.tiny import build_tiny
from cornserve.runtime.process import free_port
from cornserve.sidecar import Sidecar

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from single_executor import png_url, start, wait_healthy  # noqa: E402

RECEIVER_RANK = 0
PAUSE_S = 0.05
"""Between two requests: the machine idles as it does at a low arrival rate."""


async def through_eric(http: aiohttp.ClientSession, sc: Sidecar, url: str, model: str, image: str) -> float:
    """Seconds from the POST until both chunks of the embedding are here."""
    forward_id = uuid.uuid4().hex
    body = {
        "model_id": model,
        "modality": "image",
        "items": [{"url": image, "forward_id": forward_id, "dst_sidecar_ranks": [[RECEIVER_RANK]]}],
    }
    start_s = time.perf_counter()
    async with http.post(f"{url}/embeddings", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        await resp.read()
    await asyncio.gather(sc.recv(forward_id, 0, timeout=60), sc.recv(forward_id, 1, timeout=60))
    seconds = time.perf_counter() - start_s
    await sc.mark_done(forward_id, 0)
    await sc.mark_done(forward_id, 1)
    return seconds


async def measure(
    args: argparse.Namespace,
    http: aiohttp.ClientSession,
    sc: Sidecar,
    urls: dict[str, str],
    model: str,
    in_process: Callable[[str], float],
    times: dict[str, list[float]],
) -> None:
    """Each image through every Eric and in-process, one after the other, in a rotating order."""
    images = [png_url(i, args.image_size) for i in range(args.requests + args.warmup)]
    order = [*urls, "in-process"]
    for i, image in enumerate(images):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            await asyncio.sleep(PAUSE_S)
            if name == "in-process":
                seconds = in_process(image)
            else:
                seconds = await through_eric(http, sc, urls[name], model, image)
            if i >= args.warmup:
                times[name].append(seconds * 1e3)


async def run(args: argparse.Namespace, work: Path, nats_url: str) -> None:
    model = work / "tiny-qwen2-vl"
    build_tiny("qwen2-vl", model, seed=0)
    env = dict(os.environ, CORNSERVE_NATS_URL=nats_url, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    pythons = {"eric": sys.executable}
    if args.baseline_checkout:
        pythons["baseline eric"] = str(Path(args.baseline_checkout).resolve() / ".venv" / "bin" / "python")
    sidecar = str(Path(sys.executable).parent / "cornserve-sidecar")
    procs = []
    urls: dict[str, str] = {}
    eric_procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for rank in range(len(pythons) + 1):
            cmd = [sidecar, "--rank", str(rank), "--node", "bench", "--nats-url", nats_url]
            procs.append(start([*cmd, "--arena-bytes", str(256 << 20)], env, work / f"sidecar-{rank}.log"))
        for rank, (name, python) in enumerate(pythons.items(), start=1):
            port = free_port()
            cmd = [python, "-m", "cornserve.eric", "--model-id", str(model), "--modality", "image"]
            cmd += ["--port", str(port), "--sidecar-ranks", str(rank)]
            eric_procs[name] = start(cmd, env, work / f"{name.replace(' ', '-')}.log")
            procs.append(eric_procs[name])
            urls[name] = f"http://127.0.0.1:{port}"
        torch.set_num_threads(1)
        encoder = load_encoder(model)
        policy = MediaPolicy()

        def in_process(image: str) -> float:
            start_s = time.perf_counter()
            media = load_media(image, "image", policy)
            [encoded] = encoder.encode([encoder.preprocess(media, "image")])
            encoded.embedding.to(encoder.llm_dtype)
            return time.perf_counter() - start_s

        times: dict[str, list[float]] = {name: [] for name in [*urls, "in-process"]}
        async with aiohttp.ClientSession() as http:
            for name, url in urls.items():  # healthy Erics: every sidecar server answers by now
                await wait_healthy(http, url, eric_procs[name])
            async with Sidecar(RECEIVER_RANK, nats_url, timeout=60) as sc:
                await measure(args, http, sc, urls, str(model), in_process, times)
            for name, url in urls.items():
                async with http.get(f"{url}/info") as resp:
                    print(f"{name} /info inline: {(await resp.json()).get('inline')}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)

    print(
        f"\n{args.requests} requests, one {args.image_size}x{args.image_size} image each, {PAUSE_S * 1e3:.0f} ms apart"
    )
    print("| path | p50 ms | p90 ms |")
    print("|---|---:|---:|")
    for name, values in times.items():
        ordered = sorted(values)
        print(f"| {name} | {statistics.median(values):.2f} | {ordered[int(0.9 * len(ordered))]:.2f} |")
    for name in urls:
        diffs = [a - b for a, b in zip(times[name], times["in-process"], strict=True)]
        print(f"paired, {name} - in-process (median over requests): {statistics.median(diffs):+.2f} ms")
    if "baseline eric" in urls:
        diffs = [a - b for a, b in zip(times["eric"], times["baseline eric"], strict=True)]
        print(f"paired, eric - baseline eric (median over requests): {statistics.median(diffs):+.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--baseline-checkout", default=None, help="also run the Eric of DIR/.venv (paired)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cornserve-bench-eric-") as tmp, NatsServerProcess() as nats:
        asyncio.run(run(args, Path(tmp), nats.url))


if __name__ == "__main__":
    main()
