"""Benchmark: one LLM executor's answer to an image and a question vs its engine in process.

The LLM executor runs as a real process on one CPU torch thread (`OMP_NUM_THREADS=1`, as on one
CPU slot). Each request is one image and a short question, streamed, timed from the POST to each
chunk with text (time to first token, to the last, and per output token after the first).
Requests go one at a time, 50 ms apart (as at a low arrival rate).

- `--prompt fission` (default): the executor runs with `--receive-embeddings` and real sidecar
  servers for its rank and for this process (the producer); the image's embedding is computed
  beforehand in this process by the checkpoint's own encoder (as Eric computes it), and
  `--encode-ms` after the POST (the encoder's time, during which the executor waits) this process
  sends its two chunks as Eric does.
- `--prompt image`: the executor gets the image itself (a PNG `data:` URL) and encodes it in its
  prefill (no fission).

In the same run, alternating with each request, the floor: the executor's own `Engine` and prompt
code in this process on one torch thread, given the same request (after the same wait for
fission; the media decoded and the processor run inline for an image). `--baseline-checkout DIR`
also starts the executor of another checkout's virtual environment (`DIR/.venv`), alternating
with this one: a paired before/after comparison of a change to the executor.

    uv run --group bench python bench/llm_executor.py
    uv run --group bench python bench/llm_executor.py --baseline-checkout ../main --requests 150
    uv run --group bench python bench/llm_executor.py --prompt image --baseline-checkout ../main
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import torch

from cornserve.cli.natsserver import NatsServerProcess
from cornserve.llm_executor.detok import TextAssembler
from cornserve.llm_executor.embeddings import ReceivedEmbedding
from cornserve.llm_executor.engine import Engine
from cornserve.llm_executor.model import load_model
from cornserve.llm_executor.prompt import prepare_with_media, splice_embeddings, template_for_embeddings
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.models.encoders import load_encoder
from cornserve.models.media import load_media
from cornserve.models.media_policy import MediaPolicy
from cornserve.models.tiny import build_tiny
from cornserve.runtime.process import free_port
from cornserve.sidecar import Sidecar
from cornserve.task.builtins.chat import ChatCompletionRequest
from cornserve.task.builtins.embedding import (
    EMBEDDING_META_CHUNK,
    EMBEDDING_NUM_CHUNKS,
    EMBEDDING_TENSOR_CHUNK,
    EmbeddingMeta,
)
from cornserve.task.builtins.modality import Modality
from cornserve.task.forward import DataForward, Tensor

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from single_executor import png_url, start, wait_healthy  # noqa: E402

PRODUCER_RANK = 0
PAUSE_S = 0.05
"""Between two requests: the machine idles as it does at a low arrival rate."""
QUESTION = "What is in this picture? Answer in a few words."

Embedding = tuple[torch.Tensor, EmbeddingMeta]
Item = tuple[str, Embedding]
"""One request's image: its `data:` URL and the embedding Eric would send for it."""
Timing = tuple[float, float, float]
"""Seconds to the first token, seconds to the last, seconds per token after the first."""


def timing(start_s: float, chunks: list[float]) -> Timing:
    if not chunks:
        raise RuntimeError("the answer had no text")
    per_token = (chunks[-1] - chunks[0]) / (len(chunks) - 1) if len(chunks) > 1 else 0.0
    return chunks[0] - start_s, chunks[-1] - start_s, per_token


def messages(image_url: str) -> list[dict[str, object]]:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": content}]


async def through_executor(
    http: aiohttp.ClientSession,
    producer: Sidecar,
    url: str,
    rank: int,
    item: Item,
    *,
    args: argparse.Namespace,
) -> Timing:
    """From the POST to each chunk with text (fission: the embedding sent `encode_ms` after the POST)."""
    image_url, (tensor, meta) = item
    forward = DataForward[Tensor](src_sidecar_ranks=[PRODUCER_RANK], dst_sidecar_ranks=[[rank]])
    fission = args.prompt == "fission"
    body: dict[str, object] = {
        "messages": messages("data:," if fission else image_url),
        "max_completion_tokens": args.max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if fission:
        body["cornserve_embeddings"] = [forward.model_dump(mode="json")]

    async def encode_and_send() -> None:
        if not fission:
            return
        await asyncio.sleep(args.encode_ms / 1e3)
        dst = [[rank]]
        await asyncio.gather(
            producer.send(
                tensor, forward.id, dst, chunk_id=EMBEDDING_TENSOR_CHUNK, num_chunks=EMBEDDING_NUM_CHUNKS
            ),
            producer.send(
                meta.model_dump(mode="json"),
                forward.id,
                dst,
                chunk_id=EMBEDDING_META_CHUNK,
                num_chunks=EMBEDDING_NUM_CHUNKS,
            ),
        )

    start_s = time.perf_counter()
    chunks: list[float] = []
    sender = asyncio.create_task(encode_and_send())
    try:
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    chunks.append(time.perf_counter())
    finally:
        await sender
    return timing(start_s, chunks)


async def measure(
    args: argparse.Namespace,
    paths: dict[str, Callable[[Item], Awaitable[Timing]]],
    items: list[Item],
    times: dict[str, list[Timing]],
) -> None:
    """Each request through every executor and in-process, one after the other, in a rotating order."""
    order = list(paths)
    for i, item in enumerate(items):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            await asyncio.sleep(PAUSE_S)
            got = await paths[name](item)
            if i >= args.warmup:
                times[name].append(got)


def encode_images(model: Path, count: int, size: int) -> list[Item]:
    """`count` images, each with what Eric would send for it: the encoder's rows and their metadata."""
    encoder = load_encoder(model)
    policy = MediaPolicy()
    out = []
    for seed in range(count):
        url = png_url(seed, size)
        [encoded] = encoder.encode([encoder.preprocess(load_media(url, "image", policy), "image")])
        tensor = encoded.embedding.to(encoder.llm_dtype).contiguous()
        meta = EmbeddingMeta(
            modality=encoded.modality,
            num_tokens=int(tensor.shape[0]),
            grid_thw=list(encoded.grid_thw) if encoded.grid_thw is not None else None,
            dtype=str(tensor.dtype).removeprefix("torch."),
        )
        out.append((url, (tensor, meta)))
    return out


async def run(args: argparse.Namespace, work: Path, nats_url: str) -> None:
    model = work / "tiny-qwen2-vl"
    build_tiny("qwen2-vl", model, seed=0)
    torch.set_num_threads(1)
    items = encode_images(model, args.requests + args.warmup, args.image_size)
    env = dict(os.environ, CORNSERVE_NATS_URL=nats_url, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    pythons = {"executor": sys.executable}
    if args.baseline_checkout:
        pythons["baseline executor"] = str(
            Path(args.baseline_checkout).resolve() / ".venv" / "bin" / "python"
        )
    sidecar = str(Path(sys.executable).parent / "cornserve-sidecar")
    procs: list[subprocess.Popen[bytes]] = []
    executors: dict[str, tuple[str, int, subprocess.Popen[bytes]]] = {}
    loaded = load_model(str(model))
    engine = Engine(loaded, 4)
    policy = MediaPolicy()

    async def in_process(item: Item) -> Timing:
        """The same request in this process: the prompt (after the wait), the prefill, the tokens as text."""
        image_url, (tensor, meta) = item
        start_s = time.perf_counter()
        if args.prompt == "fission":
            request = ChatCompletionRequest.model_validate({"messages": messages("data:,")})
            await asyncio.sleep(args.encode_ms / 1e3)
            templated = template_for_embeddings(loaded, request)
            received = [ReceivedEmbedding("f", meta, tensor.clone())]
            prompt = splice_embeddings(loaded, request, templated, received)
        else:
            request = ChatCompletionRequest.model_validate({"messages": messages(image_url)})
            media = load_media(image_url, "image", policy)
            prompt = prepare_with_media(loaded, request, [(Modality.IMAGE, media)])
        seq = engine.submit("in-process", prompt, SamplingParams(temperature=0.0), args.max_tokens)
        assembler = TextAssembler(loaded.tokenizer, [])
        chunks: list[float] = []
        async for event in engine.tokens(seq, 60.0):
            token = event.token_id
            if token is not None and token not in loaded.eos_token_ids and assembler.add(token):
                chunks.append(time.perf_counter())
        return timing(start_s, chunks)

    try:
        for rank in range(len(pythons) + 1):
            cmd = [sidecar, "--rank", str(rank), "--node", "bench", "--nats-url", nats_url]
            procs.append(start([*cmd, "--arena-bytes", str(256 << 20)], env, work / f"sidecar-{rank}.log"))
        for rank, (name, python) in enumerate(pythons.items(), start=1):
            port = free_port()
            cmd = [python, "-m", "cornserve.llm_executor", "--model-id", str(model)]
            cmd += ["--receive-embeddings"] if args.prompt == "fission" else []
            cmd += ["--port", str(port), "--sidecar-ranks", str(rank), "--max-batch-size", "4"]
            proc = start(cmd, {**env, "CORNSERVE_EXECUTOR_ID": name.replace(" ", "-")}, work / f"{rank}.log")
            procs.append(proc)
            executors[name] = (f"http://127.0.0.1:{port}", rank, proc)
        engine.start()
        times: dict[str, list[Timing]] = {name: [] for name in [*executors, "in-process"]}
        async with aiohttp.ClientSession() as http:
            for url, _, proc in executors.values():  # healthy executors: every sidecar server answers by now
                await wait_healthy(http, url, proc)
            async with Sidecar(PRODUCER_RANK, nats_url, timeout=60) as producer:
                paths: dict[str, Callable[[Item], Awaitable[Timing]]] = {
                    name: functools.partial(through_executor, http, producer, url, rank, args=args)
                    for name, (url, rank, _) in executors.items()
                }
                paths["in-process"] = in_process
                await measure(args, paths, items, times)
            for name, (url, _, _) in executors.items():
                async with http.get(f"{url}/stats") as resp:
                    stats = await resp.json()
                print(
                    f"{name} /stats: {stats.get('inline_prefills', '-')} of {stats['sequences_started']} "
                    f"prefills and {stats['inline_steps']} of {stats['steps']} steps on the event loop"
                )
    finally:
        await engine.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)

    how = (
        f"its {items[0][1][1].num_tokens}-row embedding sent {args.encode_ms:g} ms after the POST"
        if args.prompt == "fission"
        else "in the request (no fission)"
    )
    print(
        f"\n{args.requests} requests, one {args.image_size}x{args.image_size} image each, {how}; "
        f"{PAUSE_S * 1e3:.0f} ms apart; at most {args.max_tokens} output tokens"
    )
    columns = ("TTFT", "E2E", "per output token")
    print("| path | " + " | ".join(f"{c} p50 ms" for c in columns) + " | TTFT p90 ms |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for name, rows in times.items():
        p50 = [statistics.median(row[k] for row in rows) * 1e3 for k in range(len(columns))]
        ttfts = sorted(row[0] for row in rows)
        cells = " | ".join(f"{v:.2f}" for v in [*p50, ttfts[int(0.9 * len(ttfts))] * 1e3])
        print(f"| {name} | {cells} |")
    pairs = [(name, "in-process") for name in executors]
    if "baseline executor" in executors:
        pairs.append(("executor", "baseline executor"))
    for a, b in pairs:
        diffs = [
            statistics.median((x[k] - y[k]) * 1e3 for x, y in zip(times[a], times[b], strict=True))
            for k in range(len(columns))
        ]
        cells = ", ".join(f"{c} {d:+.2f} ms" for c, d in zip(columns, diffs, strict=True))
        print(f"paired, {a} - {b} (median over requests): {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt", choices=["fission", "image"], default="fission")
    parser.add_argument(
        "--encode-ms", type=float, default=6.0, help="the embedding is sent this long after the POST"
    )
    parser.add_argument(
        "--baseline-checkout", default=None, help="also run the executor of DIR/.venv (paired)"
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="cornserve-bench-llm-executor-") as tmp,
        NatsServerProcess() as nats,
    ):
        asyncio.run(run(args, Path(tmp), nats.url))


if __name__ == "__main__":
    main()
