"""What vLLM can and cannot do of the Thinker-Talker roles, and the 400s the proxy answers for the rest.

- Thinker (`cornserve_hidden_states` on a chat request): vLLM's OpenAI server returns no per-token
  hidden states, so it cannot forward them; refused.
- Talker (`POST /v1/generate_from_embeds`): vLLM takes input embeddings only as a whole prompt
  given up front (`prompt_embeds` on `/v1/completions`, with `--enable-prompt-embeds`), not a stream
  it consumes one row per generated token while the producer is still running; refused.
- What it does take: precomputed image embeddings in chat requests (encoder fission, `translate.py`).

Run `ThinkerTask` / `TalkerTask` on the CPU LLM executor (`CPUThinkerDescriptor`,
`CPUTalkerDescriptor`); their descriptors never start vLLM, so these answers reach only a caller
that sends such a request to a vLLM proxy by hand.
"""

from __future__ import annotations

from typing import Any

from cornserve.task.builtins.thinker_talker import GENERATE_FROM_EMBEDS_PATH, HIDDEN_STATES_FIELD

HIDDEN_STATES_REFUSAL = (
    f"vLLM cannot serve {HIDDEN_STATES_FIELD}: its OpenAI server returns no per-token hidden states. "
    "Run the thinker as a ThinkerTask on the CPU LLM executor (CPUThinkerDescriptor)."
)
EMBEDS_STREAM_REFUSAL = (
    f"vLLM cannot serve {GENERATE_FROM_EMBEDS_PATH}: it takes input embeddings only as a whole prompt "
    "given up front (prompt_embeds on /v1/completions with --enable-prompt-embeds), not a stream consumed "
    "one row per generated token. Run the talker as a TalkerTask on the CPU LLM executor (CPUTalkerDescriptor)."
)


def role_refusal(body: dict[str, Any]) -> str | None:
    """Why vLLM cannot serve this chat request (it asks for hidden states), or None if it can."""
    return HIDDEN_STATES_REFUSAL if body.get(HIDDEN_STATES_FIELD) is not None else None
