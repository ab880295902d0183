"""Run `vllm serve` for an LLMTask; with encoder fission, hand it embeddings from the sidecar.

vLLM cannot pull tensors from a Cornserve sidecar, so an encoder-fission LLMTask on vLLM runs this
small proxy in front of `vllm serve`: it receives each media item's embedding by DataForward id,
rewrites the media parts of the chat request into vLLM's `image_embeds` / `audio_embeds` content parts, and relays
the streamed answer.
"""

from cornserve.vllm.command import VLLMServeArgs, vllm_serve_command
from cornserve.vllm.translate import EmbeddingTranslationError, ReceivedEmbedding, rewrite_request

__all__ = [
    "EmbeddingTranslationError",
    "ReceivedEmbedding",
    "VLLMServeArgs",
    "rewrite_request",
    "vllm_serve_command",
]
