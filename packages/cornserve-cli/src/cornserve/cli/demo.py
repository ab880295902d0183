"""`cornserve demo`: a local cluster serving the example multimodal app, end to end.

The demo checkpoint is a tiny model with random weights (built locally, no download): the words
it answers with are meaningless, but every step a real model takes — image preprocessing, the
encoder on Eric, embeddings through the sidecar, the LLM streaming tokens — runs for real. Set
`CORNSERVE_DEMO_MODEL` (or `--model`) to a real checkpoint directory to get real answers.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cornserve.cli.bundled import DEMO_APP_FILE, MissingExampleError, example_text
from cornserve.cli.chat import chunk_text
from cornserve.cli.launcher import LaunchError, LocalCluster
from cornserve.cli.progress import show_deploy
from cornserve.client import CornserveClient, CornserveError

DEMO_ARCH = "qwen2-vl"
DEMO_PROMPT = "What is in this picture?"


def demo_image_url() -> str:
    """A small synthetic picture (a colour gradient with a square) as a `data:` URL."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96))
    image.putdata([(x * 255 // 95, y * 255 // 95, 128) for y in range(96) for x in range(96)])
    ImageDraw.Draw(image).rectangle((28, 28, 68, 68), fill=(250, 250, 250))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def ensure_model(model: str | None, state_dir: Path) -> str:
    """The model to serve: `--model`, `$CORNSERVE_DEMO_MODEL`, or the tiny demo checkpoint (built if missing)."""
    chosen = model or os.environ.get("CORNSERVE_DEMO_MODEL")
    if chosen:
        return chosen
    path = state_dir / "models" / f"tiny-{DEMO_ARCH}"
    if (path / "config.json").exists():
        print(f"demo checkpoint: {path} (tiny, random weights)")
        return str(path)
    from cornserve.models.tiny import build_tiny  # heavy: transformers

    print(f"building the demo checkpoint (tiny {DEMO_ARCH}, random weights) in {path} ...")
    started = time.monotonic()
    build_tiny(DEMO_ARCH, path, seed=0)
    print(f"  built in {time.monotonic() - started:.1f}s")
    return str(path)


async def register_and_ask(
    cluster: LocalCluster, app_source: str, prompt: str, image_url: str, max_tokens: int
) -> None:
    """Register the demo app (progress printed) and stream one answer, with timing."""
    async with CornserveClient(cluster.url, token=cluster.admin_token, ca_file=cluster.tls_cert) as client:
        started = time.monotonic()
        print("registering examples/mllm_app.py as app 'demo' ...")
        if any(app.name == "demo" for app in await client.list_apps()):
            # The state dir keeps apps across runs; the model may have changed since, so start afresh.
            print("  app 'demo' is still registered from an earlier run; replacing it")
            await client.unregister_app("demo")
        await show_deploy(client.register_app("demo", app_source), started)  # bars on a terminal
        request: dict[str, Any] = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            "max_completion_tokens": max_tokens,
        }
        print(f"\nrequest: {prompt!r} + one 96x96 image")
        print("answer: ", end="", flush=True)
        sent = time.monotonic()
        first: float | None = None
        chunks = 0
        async for item in client.invoke_app("demo", request):
            text = chunk_text(item)
            if not text:
                continue  # the role, finish and usage chunks carry no text
            if first is None:
                first = time.monotonic()
            chunks += 1
            print(text, end="", flush=True)
        total = time.monotonic() - sent
        ttft = (first - sent) * 1000 if first is not None else float("nan")
        print(f"\n\n{chunks} chunks; time to first token {ttft:.0f} ms; total {total:.2f} s")


def run_demo(
    state_dir: Path,
    host: str,
    port: int,
    cpu_slots: int,
    model: str | None,
    once: bool,
    prompt: str,
    max_tokens: int,
    ready_timeout_s: float,
    tls: tuple[Path, Path] | None = None,
) -> int:
    """Start the cluster, build the model if needed, register the app, ask once, keep serving."""
    try:
        app_source = example_text(DEMO_APP_FILE)  # package data: no source checkout needed
    except MissingExampleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_id = ensure_model(model, state_dir)
    os.environ["CORNSERVE_DEMO_MODEL"] = model_id  # the app reads it where it runs: in the gateway
    cluster = LocalCluster(
        state_dir=state_dir, host=host, port=port, cpu_slots=cpu_slots, dispatchers=2,
        tls_cert=tls[0] if tls else None, tls_key=tls[1] if tls else None,
    )  # fmt: skip
    stopping = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    started = time.monotonic()
    try:
        cluster.start(ready_timeout_s=ready_timeout_s)
        print(
            f"Cornserve is up in {time.monotonic() - started:.1f}s: {cluster.url}  (logs: {state_dir / 'logs'})"
        )
        asyncio.run(register_and_ask(cluster, app_source, prompt, demo_image_url(), max_tokens))
        if not once:
            print(
                f"\nserving app 'demo' at {cluster.url}/apps/demo/invoke and, for OpenAI clients, "
                f"{cluster.url}/v1/chat/completions (model 'demo') — Ctrl-C stops"
            )
            print(
                f"  try: CORNSERVE_URL={cluster.url} CORNSERVE_STATE_DIR={state_dir} "
                "cornserve invoke --text demo @examples/mllm_request.json"
            )
            return cluster.supervise(lambda: stopping)
        return 0
    except KeyboardInterrupt:
        return 0
    except (LaunchError, CornserveError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("stopping Cornserve ...")
        cluster.stop()
        print("stopped")
