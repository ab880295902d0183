"""Pictures, chat messages and the transformers reference the MLLM end-to-end tests share."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import torch

MAX_TOKENS = 12
"""How long every answer is."""


def picture(seed: int, size: int = 80) -> Any:
    """A synthetic RGB picture."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    colours = [tuple(int(c) for c in torch.randint(0, 256, (3,), generator=gen)) for _ in range(3)]
    image = Image.new("RGB", (size, size), colours[0])
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 4, size // 4, size // 2, size // 2), fill=colours[1])
    draw.ellipse((size // 2, size // 3, size - 4, size - 4), fill=colours[2])
    return image


def data_url(image: Any) -> str:
    """The picture as a PNG `data:` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def messages(url: str, prompt: str) -> list[dict[str, Any]]:
    """One user turn: an image, then the question."""
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
        }
    ]


def reference_text(model_dir: Path, image: Any, prompt: str) -> str:
    """What transformers' greedy `generate` says in-process on the monolithic model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return str(processor.tokenizer.decode(new, skip_special_tokens=True))
