"""The engine's thinker path in process: hidden states of batched sequences equal each one's reference.

Three thinker sequences and a plain chat sequence of different prompt lengths join one engine at
once, so their decode steps share one padded batched forward; each thinker sequence's tokens and
per-token last-layer hidden states must equal `generate(output_hidden_states=True)` on it alone
(`cornserve.models.thinker_talker.thinker_reference`); the chat sequence's tokens are unchanged.
A multimodal thinker (Qwen2-VL with an image, M-RoPE positions) hands out what `generate` reports.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from PIL import Image
from tests.support.plugin import TinyCheckpoint
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from cornserve.llm_executor.engine import Engine
from cornserve.llm_executor.model import load_model
from cornserve.llm_executor.prompt import PreparedPrompt, prepare_with_media
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.models.thinker_talker import thinker_reference
from cornserve.task.builtins.chat import ChatCompletionRequest
from cornserve.task.builtins.modality import Modality

PROMPTS = ["Hi", "Describe a cat on a red chair, please, in detail.", "Colors?", "One two three four"]
MAX_TOKENS = 12


async def test_batched_thinker_sequences_hand_out_their_own_hidden_states(
    tiny_checkpoint: TinyCheckpoint,
) -> None:
    path = tiny_checkpoint("qwen2-thinker")
    loaded = load_model(str(path))
    loaded.eos_token_ids = frozenset()  # every sequence runs its whole budget
    reference_model = AutoModelForCausalLM.from_pretrained(path).eval()
    reference_model.generation_config.eos_token_id = None
    prompts: list[PreparedPrompt] = [
        prepare_with_media(loaded, ChatCompletionRequest(messages=[{"role": "user", "content": text}]), [])
        for text in PROMPTS
    ]
    engine = Engine(loaded, max_batch_size=4)
    engine.start()
    try:
        sinks: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
        seqs = [
            engine.submit(
                f"r{i}",
                prompt,
                SamplingParams(),
                MAX_TOKENS,
                hidden_sink=sinks[i].append if i < 3 else None,  # the last one is a plain chat
            )
            for i, prompt in enumerate(prompts)
        ]

        async def tokens(i: int) -> list[int]:
            return [e.token_id async for e in engine.tokens(seqs[i], 120.0) if e.token_id is not None]

        generated = await asyncio.gather(*(tokens(i) for i in range(len(PROMPTS))))
    finally:
        await engine.close()
    assert engine.stats.max_decode_batch_observed == len(PROMPTS)  # the rows did share forwards
    for i, prompt in enumerate(prompts):
        ref = thinker_reference(reference_model, prompt.input_ids, MAX_TOKENS)
        assert generated[i] == ref.token_ids
        if i < 3:
            torch.testing.assert_close(torch.stack(sinks[i]), ref.hidden_states, rtol=1e-4, atol=1e-4)


async def test_a_multimodal_thinker_hands_out_the_hidden_states_generate_reports(
    tiny_checkpoint: TinyCheckpoint,
) -> None:
    """Qwen2-VL with an image (M-RoPE positions): the states equal `generate`'s on the processor's inputs."""
    path = tiny_checkpoint("qwen2-vl")
    loaded = load_model(str(path))
    loaded.eos_token_ids = frozenset()
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                        {"type": "text", "text": "What is it?"},
                    ],
                }
            ]
        }
    )
    prompt = prepare_with_media(loaded, request, [(Modality.IMAGE, image)])
    inputs = {"input_ids": prompt.input_ids, **prompt.model_inputs}
    engine = Engine(loaded, max_batch_size=2)
    engine.start()
    try:
        sink: list[torch.Tensor] = []
        seq = engine.submit("mm", prompt, SamplingParams(), MAX_TOKENS, hidden_sink=sink.append)
        tokens = [e.token_id async for e in engine.tokens(seq, 120.0) if e.token_id is not None]
    finally:
        await engine.close()
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            attention_mask=torch.ones_like(prompt.input_ids),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    assert tokens == [int(t) for t in out.sequences[0, prompt.input_ids.shape[1] :]]
    expected = torch.cat([step[-1][0, -1:] for step in out.hidden_states])
    torch.testing.assert_close(torch.stack(sink), expected, rtol=1e-4, atol=1e-4)
