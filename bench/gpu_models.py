"""GPU models stage of bench/gpu_check.py: the same greedy tokens on cuda:0 as on the CPU, with
encoder fission off and on, the embedding crossing the sidecar device to device.

usage: python bench/gpu_models.py check OUT_DIR           prints one `ROW<TAB>check<TAB>result<TAB>detail` per row
       python bench/gpu_models.py encoder MODEL RANK DST   internal: Eric's encoder on cuda:0, sending

On a tiny seeded Qwen2-VL (cornserve.models.tiny, as the tests use), greedy tokens of:
  - the full transformers model on the CPU (the reference; fission off),
  - the full model on cuda:0 (fission off),
  - the language model on cuda:0 fed with the embedding Eric's encoder (cornserve.models.encoders,
    the code Eric runs) computed on cuda:0 in another process and sent through two sidecars of one
    node as a CUDA tensor (CUDA IPC: device to device), patched in where the full model would run
    its own vision tower (fission on).
This is Eric's encoder and transformers' language model in plain processes; the LLM executor server
on cuda:0 is checked by gpu_check.py through tests/llm_executor (CORNSERVE_TEST_LLM_DEVICE).
TF32 is turned off so cuda:0 computes in float32 like the CPU.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 12
PROMPT = "Describe this picture."


def picture() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def exact_float32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def inputs(processor: Any) -> Any:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=[picture()], return_tensors="pt")


def generate(model: Any, batch: Any, device: str) -> list[int]:
    batch = batch.to(device)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=MAX_TOKENS)
    return [int(t) for t in out[0, batch["input_ids"].shape[1] :].tolist()]


def encoder_role(model_dir: str, rank: int, dst: int) -> None:
    """Eric's encoder on cuda:0: encode the picture, send the embedding as a CUDA tensor."""
    from cornserve.models.encoders import load_encoder
    from cornserve.sidecar import Sidecar

    exact_float32()
    enc = load_encoder(Path(model_dir), device="cuda:0")
    (item,) = enc.encode([enc.preprocess(picture(), "image")])
    embedding = item.embedding.to("cuda:0")  # encode() hands back CPU float32 (what Eric sends today)
    sc = Sidecar(rank).connect_sync()
    try:
        sc.send_sync(embedding, "emb", [[dst]])
        assert sc.recv_sync("emb-ack", timeout=300) == "done"
        sc.mark_done_sync("emb-ack")
    finally:
        sc.close_sync()


async def fission_embedding(model_dir: Path, out: Path) -> torch.Tensor:
    from tests.support.sidecars import start_sidecars

    from cornserve.cli.natsserver import NatsServerProcess
    from cornserve.sidecar import Sidecar

    with NatsServerProcess() as nats_srv:
        os.environ["CORNSERVE_NATS_URL"] = nats_srv.url
        servers = await start_sidecars([0, 1], nats_srv.url, out)
        try:
            proc = subprocess.Popen(
                [sys.executable, __file__, "encoder", str(model_dir), "0", "1"],
                cwd=ROOT,
                env=dict(os.environ),
            )
            async with Sidecar(1, timeout=300) as sc:
                got = await sc.recv("emb", timeout=300, device=0)
                if not got.is_cuda:
                    raise AssertionError(f"the embedding arrived on {got.device}, not a GPU")
                emb = got.clone()
                torch.cuda.synchronize()
                del got
                await sc.mark_done("emb")
                await sc.send("done", "emb-ack", [[0]])
            if await asyncio.to_thread(proc.wait, 300) != 0:
                raise AssertionError("the encoder process failed")
            return emb
        finally:
            for s in servers:
                s.stop()


def with_embedding(model: Any, embedding: torch.Tensor) -> None:
    """Make the full model use ``embedding`` instead of running its own vision tower (fission)."""
    inner = model.model

    def get_image_features(pixel_values: Any, image_grid_thw: Any = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = embedding.to(inner.language_model.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=(features,))

    inner.get_image_features = get_image_features


def check(out: Path) -> list[tuple[str, str, str]]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from cornserve.models.tiny import build_tiny

    exact_float32()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny("qwen2-vl", out / "tiny-qwen2-vl", seed=0)
    processor = AutoProcessor.from_pretrained(model_dir)
    batch = inputs(processor)
    cpu_model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    reference = generate(cpu_model, batch, "cpu")
    gpu_model = AutoModelForImageTextToText.from_pretrained(model_dir).eval().to("cuda:0")
    mono = generate(gpu_model, batch, "cuda:0")
    rows = [
        ("qwen2-vl greedy, fission off: CPU", "INFO", f"{len(reference)} tokens {reference}"),
        (
            "qwen2-vl greedy, fission off: cuda:0 == CPU",
            "PASS" if mono == reference else "FAIL",
            f"{mono}",
        ),
    ]
    embedding = asyncio.run(fission_embedding(model_dir, out))
    with_embedding(gpu_model, embedding)
    fission = generate(gpu_model, batch, "cuda:0")
    rows.append(
        (
            "qwen2-vl greedy, fission on (Eric's encoder on cuda:0 -> sidecar CUDA IPC -> LM on cuda:0) == CPU",
            "PASS" if fission == reference else "FAIL",
            f"{fission}; embedding {tuple(embedding.shape)} arrived on {embedding.device}",
        )
    )
    return rows


def main() -> None:
    if sys.argv[1] == "encoder":
        encoder_role(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    sys.path.insert(0, str(ROOT))
    for check_name, result, detail in check(Path(sys.argv[2])):
        print(f"ROW\t{check_name}\t{result}\t{detail}", flush=True)


if __name__ == "__main__":
    main()
