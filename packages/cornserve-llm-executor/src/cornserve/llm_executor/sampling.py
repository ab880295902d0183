"""Per-request decoding parameters and token selection (greedy, or temperature + top-p sampling).

Greedy is a plain argmax over the last position's logits, which is what transformers'
`generate(do_sample=False)` does, so greedy output matches it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. `temperature == 0` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether decoding is deterministic argmax."""
        return self.temperature <= 0.0

    def make_generator(self) -> torch.Generator | None:
        """A private RNG for this request: seeded requests reproduce exactly, others are random."""
        if self.greedy:
            return None
        gen = torch.Generator(device="cpu")
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        return gen


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token id from `logits` of shape `[vocab]`."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    scaled = logits.float() / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cumulative - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, sorted_idx, sorted_probs)
    choice = torch.multinomial(probs, num_samples=1, generator=generator)
    return int(choice.item())
