"""The Thinker-Talker pair: what a talker step takes, and an in-process reference with transformers.

A *thinker* is a causal LM whose last-layer hidden state at each generated token is forwarded, in
order, to a *talker*. The talker is a causal LM that generates one token per received hidden state
(the Qwen2.5-Omni pattern, minus audio): its input embedding at step `t` is

    x_0 = h_0,    x_t = h_t + E(y_{t-1})   (t >= 1)

where `h_t` is the thinker's hidden state that produced the thinker's token `t`, `E` the talker's
token embedding and `y_{t-1}` the talker's previous token. Because step `t` needs only `h_0..h_t`,
the talker starts on the first hidden state, before the thinker finishes. It stops after a token
in its end-of-sequence set ("stop"), after `max_tokens` tokens ("length"), or when the hidden
states run out ("stop"). The talker's hidden size must equal the thinker's (the tiny
`qwen2-talker` records it as `thinker_hidden_size`).

`talker_step_input` is that rule, used by the LLM executor and by the reference below.
`thinker_reference` and `talker_reference` compute the pair the plain transformers way
(`generate(output_hidden_states=True)`, then a cache-free loop over the talker's full input each
step) so tests can compare a served pair with them token for token.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch


def talker_step_input(hidden: torch.Tensor, previous_token_embedding: torch.Tensor | None) -> torch.Tensor:
    """The talker's input embedding for one step: the thinker's hidden state plus its previous token's embedding."""
    if previous_token_embedding is None:
        return hidden
    return hidden + previous_token_embedding


def chat_prompt_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """`[1, L]` ids of a one-message user chat, rendered by the checkpoint's chat template as the LLM executor does."""
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids: torch.Tensor = tokenizer(str(rendered), return_tensors="pt")["input_ids"]
    return ids


@dataclass(frozen=True)
class ThinkerReference:
    """The thinker's greedy tokens and, per token, the last-layer hidden state that produced it."""

    token_ids: list[int]
    hidden_states: torch.Tensor
    """`[len(token_ids), hidden]` float32."""


@dataclass(frozen=True)
class TalkerReference:
    """The talker's greedy tokens and why it stopped ("stop" or "length")."""

    token_ids: list[int]
    finish_reason: str


def thinker_reference(model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> ThinkerReference:
    """Greedy `generate` with `output_hidden_states`: token `k`'s hidden state is step `k`'s last position."""
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
    tokens = [int(t) for t in out.sequences[0, input_ids.shape[1] :]]
    hidden = torch.cat([step[-1][0, -1:] for step in out.hidden_states], dim=0).to(torch.float32)
    return ThinkerReference(token_ids=tokens, hidden_states=hidden[: len(tokens)])


def talker_reference(
    model: Any, hidden_states: torch.Tensor, max_tokens: int, eos_token_ids: Collection[int]
) -> TalkerReference:
    """The talker's greedy tokens on `hidden_states` (`[N, hidden]`), recomputing its whole input each step (no cache)."""
    embed = model.get_input_embeddings()
    dtype = next(model.parameters()).dtype
    inputs: list[torch.Tensor] = []
    tokens: list[int] = []
    with torch.inference_mode():
        for step in range(min(int(hidden_states.shape[0]), max_tokens)):
            previous = embed(torch.tensor([tokens[-1]]))[0] if tokens else None
            inputs.append(talker_step_input(hidden_states[step].to(dtype), previous))
            logits = model(inputs_embeds=torch.stack(inputs).unsqueeze(0)).logits[0, -1]
            tokens.append(int(torch.argmax(logits)))
            if tokens[-1] in eos_token_ids:
                return TalkerReference(tokens, "stop")
            if len(tokens) >= max_tokens:
                return TalkerReference(tokens, "length")
    return TalkerReference(tokens, "stop")
