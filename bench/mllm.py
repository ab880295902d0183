"""Benchmark: image + text requests through Cornserve, encoder fission vs monolithic, vs in-process.

For each app (one MLLMTask with `encoder_fission=True`, one with `False`, same checkpoint) and each
arrival rate, N requests arrive as a Poisson process (seeded) and are sent through the gateway's
streaming invoke; per request it records the time to the first streamed chunk (TTFT), the time per
output token after that (TPOT) and the end-to-end latency. In the same run the same model runs
in-process with transformers (`generate`, one request at a time, no serving system) on the same
inputs: the difference at the lowest rate is Cornserve's orchestration overhead (HTTP, NATS,
dispatch, sidecar, separate processes).

    uv run python bench/mllm.py                 # tiny random Qwen2-VL checkpoint, built on the fly
    uv run python bench/mllm.py --model DIR     # any local checkpoint of a supported family
    uv run python bench/mllm.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from cornserve.cli.launcher import LocalCluster
from cornserve.client import CornserveClient
from cornserve.llm_executor.detok import TextAssembler
from cornserve.runtime.process import free_port

APP_TEMPLATE = """
from collections.abc import AsyncIterator

from pydantic import BaseModel

from cornserve.app import AppConfig
from cornserve.task.builtins import ChatCompletionRequest, MLLMTask, Modality

mllm = MLLMTask(model_id={model!r}, modalities=[Modality.IMAGE], encoder_fission={fission!r})


class Config(AppConfig):
    tasks = {{"mllm": mllm}}


class Request(BaseModel):
    prompt: str
    image_url: str
    max_completion_tokens: int


class Response(BaseModel):
    text: str = ""
    completion_tokens: int | None = None


async def serve(request: Request) -> AsyncIterator[Response]:
    chat = ChatCompletionRequest.model_validate(
        {{
            "messages": [
                {{
                    "role": "user",
                    "content": [
                        {{"type": "image_url", "image_url": {{"url": request.image_url}}}},
                        {{"type": "text", "text": request.prompt}},
                    ],
                }}
            ],
            "max_completion_tokens": request.max_completion_tokens,
        }}
    )
    async for chunk in await mllm(chat):
        for choice in chunk.choices:
            if choice.delta.content:
                yield Response(text=choice.delta.content)
"""

PROMPTS = ["What is in this picture?", "Describe the colours.", "Is there a square?", "What shape is it?"]


def make_image(index: int, size: int) -> tuple[str, Any]:
    """A distinct synthetic picture as a `data:` URL, and the PIL image."""
    from PIL import Image, ImageDraw

    rng = random.Random(index)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size // 2), rng.randrange(size // 2)
        draw.rectangle((x, y, x + size // 3, y + size // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image


@dataclass
class Sample:
    """One request's timeline (seconds, monotonic clock)."""

    sent: float
    first: float | None = None
    last: float | None = None
    """When the last text chunk arrived (the stream may close later: `tail`)."""
    done: float | None = None
    chunks: int = 0
    tokens: int | None = None
    error: str | None = None

    def text_chunk(self) -> None:
        """A text chunk arrived now."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.chunks += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def e2e(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def tail(self) -> float | None:
        """From the last text chunk to the end of the stream (what a relay adds after the last token)."""
        return None if self.last is None or self.done is None else self.done - self.last

    @property
    def tpot(self) -> float | None:
        count = self.tokens if self.tokens is not None else self.chunks
        if self.first is None or self.done is None or count < 2:
            return None
        return (self.done - self.first) / (count - 1)


@dataclass
class Result:
    """One (system, rate) cell of the table."""

    system: str
    rate: str
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds (user + system) each group of processes spent during the cell (`CpuMeter`)."""
    idle_cpu: dict[str, float] = field(default_factory=dict)
    """What the same groups spend idle over as long as the cell took (measured before the cells)."""

    def tokens(self) -> int:
        return sum(s.tokens if s.tokens is not None else s.chunks for s in self.ok())

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None and s.done is not None]

    def print_errors(self, where: str) -> None:
        for s in self.samples:
            if s.error:
                print(f"  error ({where}): {s.error}")

    def row(self) -> list[str]:
        ok = self.ok()
        errors = len(self.samples) - len(ok)

        def pct(values: list[float], q: float) -> str:
            if not values:
                return "-"
            values = sorted(values)
            return f"{values[min(len(values) - 1, int(q * len(values)))] * 1e3:.0f}"

        ttft = [s.ttft for s in ok if s.ttft is not None]
        tpot = [s.tpot for s in ok if s.tpot is not None]
        e2e = [s.e2e for s in ok if s.e2e is not None]
        tail = [s.tail for s in ok if s.tail is not None]
        tokens = sum(s.tokens if s.tokens is not None else s.chunks for s in ok)
        return [
            self.system,
            self.rate,
            f"{len(ok) / self.wall:.2f}" if self.wall else "-",
            f"{tokens / self.wall:.1f}" if self.wall else "-",
            pct(ttft, 0.5),
            f"{statistics.mean(tpot) * 1e3:.2f}" if tpot else "-",
            pct(e2e, 0.5),
            pct(e2e, 0.99),
            f"{statistics.median(tail) * 1e3:.1f}" if tail else "-",
            f"{statistics.median(tpot) * 1e3:.2f}" if tpot else "-",
            str(errors),
        ]


HEADER = [
    "system",
    "rate req/s",
    "req/s",
    "tok/s",
    "TTFT p50 ms",
    "TPOT ms",
    "E2E p50 ms",
    "E2E p99 ms",
    "tail p50 ms",
    "TPOT p50 ms",
    "errors",
]


class CpuMeter:
    """CPU time (user + system) of the cluster's processes, by group, from psutil.

    Groups: `relays` (gateway, dispatchers, nats-server: every process a streamed token crosses
    between the executor and the client) and `executors` (the executors of the deployed tasks,
    found through GET /tasks). Read before and after a cell; the difference divided by the cell's
    output tokens is the CPU each token costs.
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        import psutil

        self._procs = {
            name: [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
            for name, pids in groups.items()
        }

    def read(self) -> dict[str, float]:
        import psutil

        totals: dict[str, float] = {}
        for name, procs in self._procs.items():
            total = 0.0
            for proc in procs:
                try:
                    times = proc.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += times.user + times.system
            totals[name] = total
        return totals


async def relay_counts(session: aiohttp.ClientSession, urls: list[str]) -> tuple[float, float]:
    """(stream items, bus messages) the dispatchers relayed so far, summed from their metrics pages."""
    items = messages = 0.0
    for url in urls:
        async with session.get(url) as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("cornserve_task_stream_items_total{"):
                items += float(line.rsplit(" ", 1)[1])
            elif line.startswith("cornserve_task_stream_messages_total{"):
                messages += float(line.rsplit(" ", 1)[1])
    return items, messages


RELAY_PARTS = ("gateway", "dispatchers", "nats")
"""The relay processes, each group also measured on its own (the per-process columns)."""


async def cluster_cpu_meter(cluster: LocalCluster, client: CornserveClient) -> CpuMeter:
    """A CpuMeter over the cluster's relays (gateway, dispatchers, NATS), each of them, and its executors."""
    gateway = [c.proc.pid for c in cluster.children if c.proc is not None and c.name.startswith("gateway")]
    dispatchers = [
        c.proc.pid for c in cluster.children if c.proc is not None and c.name.startswith("dispatcher")
    ]
    nats = [cluster.nats.pid] if cluster.nats is not None and cluster.nats.pid is not None else []
    listing = await client.list_tasks()
    executors = [e.pid for t in listing.tasks for e in t.executors if e.pid is not None]
    return CpuMeter(
        {
            "relays": gateway + dispatchers + nats,
            "gateway": gateway,
            "dispatchers": dispatchers,
            "nats": nats,
            "executors": executors,
        }
    )


def print_table(rows: list[list[str]]) -> None:
    """A Markdown table."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    print(line(HEADER))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any], sample: Sample) -> None:
    """Stream one invoke; record first-chunk and end times."""
    try:
        async with session.post(url, json=body, headers={"Accept": "application/x-ndjson"}) as response:
            if response.status != 200:
                sample.error = f"{response.status}: {(await response.text())[:200]}"
                return
            async for line in response.content:
                if not line.strip():
                    continue
                item = json.loads(line)
                if "error" in item:
                    sample.error = str(item["error"])[:200]
                    return
                if item.get("completion_tokens") is not None:
                    sample.tokens = int(item["completion_tokens"])
                    continue
                sample.text_chunk()
        sample.done = time.monotonic()
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"


async def one_direct_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], sample: Sample
) -> None:
    """Stream one chat completion straight from the LLM executor (SSE); record first-chunk and end times."""
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                sample.error = f"{response.status}: {(await response.text())[:200]}"
                return
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data:") :])
                if "error" in chunk:
                    sample.error = str(chunk["error"])[:200]
                    return
                # Tokens are counted as text chunks, as for the app (whose items carry no usage):
                # a random checkpoint's tokens often decode to no text yet (partial UTF-8).
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        sample.text_chunk()
        sample.done = time.monotonic()
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"


def direct_bodies(model: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The app bodies as the OpenAI chat requests the monolithic app's LLM task sends its executor."""
    return [
        {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": b["image_url"]}},
                        {"type": "text", "text": b["prompt"]},
                    ],
                }
            ],
            "max_completion_tokens": b["max_completion_tokens"],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for b in bodies
    ]


async def direct_run(executor_url: str, rate: float, bodies: list[dict[str, Any]], seed: int) -> Result:
    """The monolithic app's LLM executor called straight (no gateway, dispatcher or NATS), same arrivals."""
    result = Result("monolithic executor direct", f"{rate:g}")
    url = f"{executor_url}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await poisson_arrivals(
            result, rate, seed, bodies, lambda body, s: one_direct_request(session, url, body, s)
        )
    result.print_errors(f"direct @ {rate:g}/s")
    return result


async def monolithic_executor_url(client: CornserveClient) -> str | None:
    """The URL of the LLM executor serving the monolithic app (the LLM task it alone uses)."""
    listing = await client.list_tasks()
    for task in listing.tasks:
        if task.users == ["app:monolithic"] and "LLM" in task.task and task.executors:
            return task.executors[0].url
    return None


async def print_engine_stats(client: CornserveClient) -> None:
    """Where each LLM executor's steps and prefills ran (`/stats`: inline on the event loop, or a thread)."""
    listing = await client.list_tasks()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for task in listing.tasks:
            if "LLM" not in task.task:
                continue
            for executor in task.executors:
                async with session.get(f"{executor.url}/stats") as response:
                    stats = await response.json()
                print(
                    f"  {' '.join(task.users)} LLM executor: {stats['inline_steps']} of {stats['steps']} steps "
                    f"and {stats.get('inline_prefills', '-')} of {stats['sequences_started']} prefills "
                    "ran on its event loop"
                )


async def poisson_run(
    gateway: str, token: str, app: str, rate: float, bodies: list[dict[str, Any]], seed: int
) -> Result:
    """Send `bodies` to an app with Poisson arrivals (`token`: the gateway's bearer token)."""
    result = Result(app, f"{rate:g}")
    url = f"{gateway}/apps/{app}/invoke"
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600), headers={"Authorization": f"Bearer {token}"}
    ) as session:
        await poisson_arrivals(result, rate, seed, bodies, lambda body, s: one_request(session, url, body, s))
    result.print_errors(f"{app} @ {rate:g}/s")
    return result


async def poisson_arrivals(
    result: Result,
    rate: float,
    seed: int,
    bodies: list[dict[str, Any]],
    send: Callable[[dict[str, Any], Sample], Coroutine[Any, Any, None]],
) -> None:
    """`send` each body with exponential inter-arrival gaps of mean 1/rate; the samples and wall time go to `result`."""
    rng = random.Random(seed)
    start = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    for body in bodies:
        sample = Sample(sent=time.monotonic())
        result.samples.append(sample)
        tasks.append(asyncio.create_task(send(body, sample)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    result.wall = time.monotonic() - start


class InProcess:
    """The same model and inputs in this process with transformers, one request at a time.

    On `threads` torch threads: 1 matches the LLM executor on one CPU slot (its OMP_NUM_THREADS),
    and keeps the floor from collapsing when other processes share the cores (torch's thread
    pool spins and stalls on an oversubscribed machine).
    """

    def __init__(self, model_dir: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch.set_num_threads(threads)
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids: list[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def one(self, prompt: str, image: Any, max_tokens: int) -> Sample:
        """Generate one answer (greedy), timing its tokens as the served rows are timed."""
        import torch
        from transformers.generation.streamers import BaseStreamer

        tokenizer = self.processor.tokenizer
        eos = set(self.eos_ids)

        class Clock(BaseStreamer):
            """Times text chunks as the served rows see them: the LLM executor's detokenizer decides
            which tokens make text (a random checkpoint's tokens are often partial UTF-8 or EOS)."""

            def __init__(self, sample: Sample) -> None:
                self.sample, self.prompt_seen = sample, False
                self.assembler = TextAssembler(tokenizer, [])

            def put(self, value: Any) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    if token in eos or not self.assembler.add(token):
                        continue
                    if self.sample.first is None:
                        self.sample.first = time.monotonic()
                    self.sample.last = time.monotonic()
                    self.sample.chunks += 1

            def end(self) -> None:
                if self.assembler.flush():
                    self.sample.chunks += 1
                self.sample.done = time.monotonic()

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        sample = Sample(sent=time.monotonic())
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=[image], return_tensors="pt")
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, streamer=Clock(sample))
        return sample


def in_process(model_dir: str, requests: list[tuple[str, Any, int]], threads: int) -> Result:
    """The in-process floor: `requests` back to back (`InProcess`)."""
    local = InProcess(model_dir, threads)
    local.one(*requests[0])  # warm-up
    result = Result("in-process transformers", "back-to-back")
    start = time.monotonic()
    for prompt, image, max_tokens in requests:
        result.samples.append(local.one(prompt, image, max_tokens))
    result.wall = time.monotonic() - start
    return result


async def paired_run(
    cluster: LocalCluster,
    systems: list[str],
    executor_url: str | None,
    local: InProcess,
    bodies: list[dict[str, Any]],
    direct: list[dict[str, Any]],
    requests: list[tuple[str, Any, int]],
    rate: float,
) -> dict[str, Result]:
    """Each input through every system and in-process, one right after the other (rotating order).

    The rows' samples are taken seconds apart at most, so a shared machine's load moves them
    together; the per-request differences (`paired_overheads`) are the overhead at that moment.
    Requests are spaced by exponential gaps of mean 1/rate (no two overlap).
    """
    rng = random.Random(7)
    names = [*systems, *(["monolithic executor direct"] if executor_url else []), "in-process transformers"]
    results = {name: Result(name, f"paired {rate:g}") for name in names}
    headers = {"Authorization": f"Bearer {cluster.admin_token}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
        aiohttp.ClientSession(timeout=timeout) as plain,
    ):
        start = time.monotonic()
        for i, body in enumerate(bodies):
            # The order rotates: whichever runs first finds its process's caches cold (the others
            # ran in between), and the direct call right after the monolithic app's finds them warm.
            for name in names[i % len(names) :] + names[: i % len(names)]:
                sample = Sample(sent=time.monotonic())
                if name == "in-process transformers":
                    sample = local.one(*requests[i])
                elif name == "monolithic executor direct":
                    assert executor_url is not None
                    await one_direct_request(plain, f"{executor_url}/v1/chat/completions", direct[i], sample)
                else:
                    await one_request(session, f"{cluster.url}/apps/{name}/invoke", body, sample)
                results[name].samples.append(sample)
            await asyncio.sleep(rng.expovariate(rate))
        wall = time.monotonic() - start
    for result in results.values():
        result.wall = wall
        result.print_errors(f"{result.system}, paired")
    return results


def paired_overheads(results: dict[str, Result]) -> None:
    """Median over requests of (system - in-process) for TTFT, E2E and TPOT, and system - direct."""
    base = results["in-process transformers"].samples

    def median_diff(rows: list[Sample], against: list[Sample], metric: str) -> str:
        diffs = [
            getattr(a, metric) - getattr(b, metric)
            for a, b in zip(rows, against, strict=True)
            if a.error is None and getattr(a, metric) is not None and getattr(b, metric) is not None
        ]
        return f"{statistics.median(diffs) * 1e3:+.2f} ms" if diffs else "-"

    for name, result in results.items():
        if name == "in-process transformers":
            continue
        print(
            f"paired, {name} - in-process (median over requests): TTFT {median_diff(result.samples, base, 'ttft')}, "
            f"E2E {median_diff(result.samples, base, 'e2e')}, per output token {median_diff(result.samples, base, 'tpot')}"
        )
    direct = results.get("monolithic executor direct")
    if direct is not None and "monolithic" in results:
        mono = results["monolithic"].samples
        print(
            f"paired, monolithic - its executor called straight (the relays): TTFT {median_diff(mono, direct.samples, 'ttft')}, "
            f"E2E {median_diff(mono, direct.samples, 'e2e')}, per output token {median_diff(mono, direct.samples, 'tpot')}"
        )


async def main_async(args: argparse.Namespace) -> None:
    """Build/locate the model, start a cluster, run both apps at each rate, then in-process."""
    workdir = Path(tempfile.mkdtemp(prefix="cornserve-bench-mllm-"))
    model = args.model
    if model is None:
        from cornserve.models.tiny import build_tiny

        model = str(build_tiny(args.arch, workdir / f"tiny-{args.arch}", seed=0))
        print(f"built a tiny {args.arch} checkpoint (random weights) in {model}")
    rates = [float(r) for r in args.rates.split(",")]
    images = [make_image(i, args.image_size) for i in range(args.requests)]
    requests = [(PROMPTS[i % len(PROMPTS)], images[i][1], args.max_tokens) for i in range(args.requests)]
    bodies = [
        {"prompt": p, "image_url": images[i][0], "max_completion_tokens": args.max_tokens}
        for i, (p, _, _) in enumerate(requests)
    ]
    cluster = LocalCluster(state_dir=workdir / "cluster", port=free_port(), cpu_slots=3, dispatchers=2)
    rows: list[list[str]] = []
    results: list[Result] = []
    paired: dict[str, Result] = {}
    systems = [s for s in ("fission", "monolithic") if s in args.systems.split(",")]
    try:
        # `start` runs its own event loops (NATS buckets): off this one.
        await asyncio.to_thread(cluster.start, ready_timeout_s=300)
        async with CornserveClient(cluster.url, token=cluster.admin_token) as client:
            for name, fission in (("fission", True), ("monolithic", False)):
                if name not in systems:
                    continue
                t0 = time.monotonic()
                async for _ in client.register_app(name, APP_TEMPLATE.format(model=model, fission=fission)):
                    pass
                print(f"registered app {name!r} (encoder_fission={fission}) in {time.monotonic() - t0:.1f}s")
            for name in systems:  # warm-up: first requests pay lazy initialisation
                await poisson_run(cluster.url, cluster.admin_token, name, 100.0, bodies[:2], seed=0)
            meter = await cluster_cpu_meter(cluster, client)
        # What the processes burn with no request (keepalives, health checks, metrics): subtracted
        # from each cell, so the per-token figure is the work the tokens cause.
        idle_before = meter.read()
        await asyncio.sleep(args.idle_s)
        idle_rate = {k: (v - idle_before[k]) / args.idle_s for k, v in meter.read().items()}
        dispatcher_metrics = [url for name, url in cluster.metrics.items() if name.startswith("dispatcher")]
        for rate in rates:
            for name in systems:
                print(f"running {name} at {rate:g} req/s ({args.requests} requests) ...")
                before = meter.read()
                async with aiohttp.ClientSession() as scraper:
                    counts_before = await relay_counts(scraper, dispatcher_metrics)
                result = await poisson_run(
                    cluster.url, cluster.admin_token, name, rate, bodies, seed=int(rate * 1000)
                )
                after = meter.read()
                async with aiohttp.ClientSession() as scraper:
                    counts_after = await relay_counts(scraper, dispatcher_metrics)
                relayed, messages = (a - b for a, b in zip(counts_after, counts_before, strict=True))
                if messages:
                    print(f"  dispatchers relayed {relayed:.0f} items in {messages:.0f} bus messages")
                result.cpu = {k: after[k] - before[k] for k in after}
                result.idle_cpu = {k: idle_rate[k] * result.wall for k in after}
                rows.append(result.row())
                results.append(result)
                print("  " + " | ".join(result.row()), flush=True)
            if "monolithic" in systems and args.direct:
                async with CornserveClient(cluster.url, token=cluster.admin_token) as client:
                    executor = await monolithic_executor_url(client)
                if executor is None:
                    print("  no executor of the monolithic app's LLM task found: no direct row")
                    continue
                direct = direct_bodies(model, bodies)
                await direct_run(executor, 100.0, direct[:2], seed=0)  # warm-up
                result = await direct_run(executor, rate, direct, seed=int(rate * 1000))
                rows.append(result.row())
                print("  " + " | ".join(result.row()), flush=True)
        if args.paired:
            executor = None
            if "monolithic" in systems and args.direct:
                async with CornserveClient(cluster.url, token=cluster.admin_token) as client:
                    executor = await monolithic_executor_url(client)
            local_model = InProcess(model, args.inprocess_threads)
            local_model.one(*requests[0])  # warm-up
            count = min(args.paired, len(bodies))
            print(
                f"running the paired sequence ({count} inputs, each through every system, then in-process) ..."
            )
            paired = await paired_run(
                cluster,
                systems,
                executor,
                local_model,
                bodies[:count],
                direct_bodies(model, bodies)[:count],
                requests[:count],
                min(rates),
            )
        async with CornserveClient(cluster.url, token=cluster.admin_token) as client:
            await print_engine_stats(client)
    finally:
        await asyncio.to_thread(cluster.stop)
    print("running the same model in-process (transformers generate, sequential) ...")
    local = in_process(model, requests, args.inprocess_threads)
    rows.append(local.row())
    print(
        f"\nmodel: {model}; {args.requests} requests per cell; max_completion_tokens={args.max_tokens}; "
        f"image {args.image_size}x{args.image_size}; 2-core CPU, no GPU"
    )
    print_table(rows)
    low = min(rates)
    cells = {(r[0], r[1]): r for r in rows}
    base = local.row()
    for name in systems:
        row = cells.get((name, f"{low:g}"))
        if row and row[6] != "-" and base[6] != "-":
            added = float(row[5]) - float(base[5]) if row[5] != "-" and base[5] != "-" else float("nan")
            print(
                f"orchestration overhead ({name} at {low:g} req/s vs in-process): "
                f"E2E p50 +{int(row[6]) - int(base[6])} ms, TTFT p50 +{int(row[4]) - int(base[4])} ms, "
                f"added per output token (TPOT) +{added:.2f} ms"
            )
    for rate in rates:
        served, direct_row = (
            cells.get(("monolithic", f"{rate:g}")),
            cells.get(("monolithic executor direct", f"{rate:g}")),
        )
        if served and direct_row and "-" not in (served[5], direct_row[5], served[6], direct_row[6]):
            print(
                f"relays (gateway, dispatcher, NATS) at {rate:g} req/s, monolithic vs its executor called straight: "
                f"TPOT +{float(served[5]) - float(direct_row[5]):.2f} ms, E2E p50 +{int(served[6]) - int(direct_row[6])} ms"
            )
    if paired:
        print(
            "\npaired: each input through every system and in-process back to back, rotating order (the same moment's load):"
        )
        print_table([r.row() for r in paired.values()])
        paired_overheads(paired)
    print("\nCPU per output token (user + system, summed over the processes of each group):")
    print(
        "| system | rate req/s | tokens | relays ms/token | relays less idle | gateway less idle | "
        "dispatchers less idle | nats less idle | executors ms/token |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        tokens = result.tokens()
        if tokens and result.cpu:
            less_idle = {k: (result.cpu[k] - result.idle_cpu.get(k, 0.0)) / tokens * 1e3 for k in result.cpu}
            parts = " | ".join(f"{less_idle[k]:.2f}" for k in RELAY_PARTS)
            print(
                f"| {result.system} | {result.rate} | {tokens} | {result.cpu['relays'] / tokens * 1e3:.2f} | "
                f"{less_idle['relays']:.2f} | {parts} | {result.cpu['executors'] / tokens * 1e3:.2f} |"
            )
    print(
        "(relays: gateway + dispatchers + nats-server; executors: Eric and the LLM executor; "
        "less idle: minus what a group burns with no request over the cell's wall time; "
        "the figures include each request's own costs, divided by its tokens)"
    )


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="checkpoint dir (default: build a tiny random one)")
    parser.add_argument("--arch", default="qwen2-vl", help="family of the tiny checkpoint")
    parser.add_argument("--requests", type=int, default=24, help="requests per (app, rate)")
    parser.add_argument("--rates", default="1,4,16,64", help="Poisson arrival rates, req/s")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 requests at 2 and 8 req/s")
    parser.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="skip the monolithic app's LLM executor called straight (no relays) at each rate",
    )
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle CPU measured over this long")
    parser.add_argument(
        "--inprocess-threads",
        type=int,
        default=1,
        help="torch threads of the in-process run (1: as an executor)",
    )
    parser.add_argument(
        "--systems", default="fission,monolithic", help="apps to run: fission, monolithic or both"
    )
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="N",
        help="also send N inputs through every system and in-process one after the other (rotating order), at the lowest "
        "rate, and report the per-request differences (robust on a shared machine)",
    )
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rates, args.max_tokens = 6, "2,8", 8
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
