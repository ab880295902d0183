"""From an OpenAI chat request to the token ids, media inputs and positions of a prefill.

Two ways in, one shape out (`PreparedPrompt`):

- raw media (no fission): the chat-templated text and the decoded media go through the model's
  own processor, exactly as `model.generate(**processor(...))` would receive them;
- embeddings (encoder fission): the chat-templated text is tokenized with one placeholder per
  media item while the embeddings are on their way (`template_for_embeddings`); once they are in,
  each placeholder is expanded to its forward's `num_tokens` copies, as the processor would
  tokenize them, and the received embeddings are spliced in at those positions during prefill
  (`splice_embeddings`).

Qwen2-VL-family positions come from the model's own `get_rope_index` in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from cornserve.llm_executor.embeddings import ReceivedEmbedding
from cornserve.llm_executor.errors import EmbeddingError, InvalidRequest
from cornserve.llm_executor.model import LoadedModel
from cornserve.task.builtins.chat import (
    AudioURLPart,
    ChatCompletionRequest,
    ImageURLPart,
    InputAudioPart,
    TextPart,
    VideoURLPart,
)
from cornserve.task.builtins.modality import Modality


@dataclass
class PreparedPrompt:
    """Everything the engine needs to prefill one sequence."""

    input_ids: torch.Tensor
    """`[1, L]` prompt token ids (placeholders already expanded)."""
    position_ids: torch.Tensor
    """`[4, 1, L]` (M-RoPE: text row + 3 rope rows) or `[1, L]`."""
    rope_delta: int = 0
    """M-RoPE offset of positions after the prompt (0 for 1-D positions)."""
    model_inputs: dict[str, Any] = field(default_factory=dict)
    """Extra prefill kwargs from the processor (pixel values, grids) when the model encodes media itself."""
    media_embeds: torch.Tensor | None = None
    """`[N, H]` received embeddings, spliced at `media_positions` (encoder fission)."""
    media_positions: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt length in tokens."""
        return int(self.input_ids.shape[1])


def hf_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """OpenAI messages → the list-of-parts conversation HF chat templates render."""
    out: list[dict[str, Any]] = []
    for message in request.messages:
        parts: list[dict[str, Any]] = []
        content = message.content
        if content is None:
            parts.append({"type": "text", "text": ""})
        elif isinstance(content, str):
            parts.append({"type": "text", "text": content})
        else:
            for part in content:
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                elif isinstance(part, ImageURLPart):
                    parts.append({"type": "image"})
                elif isinstance(part, VideoURLPart):
                    parts.append({"type": "video"})
                elif isinstance(part, AudioURLPart | InputAudioPart):
                    parts.append({"type": "audio"})
        out.append({"role": message.role, "content": parts})
    return out


INLINE_PROMPT_CHARS = 4096
"""Prompts whose messages hold at most this many characters of text are prepared for embeddings on
the event loop: a worker thread's hand-off cost ~1.5 ms of the ~0.5 ms such a prompt takes
(tiny Qwen2-VL, one torch thread); a 15 000-character prompt took ~11 ms, so the longest inline
preparation holds the loop for ~3 ms (docs/executors.md)."""


def text_chars(request: ChatCompletionRequest) -> int:
    """Characters of text in the request's messages (what tokenizing the prompt scales with)."""
    total = 0
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += sum(len(part.text) for part in content if isinstance(part, TextPart))
    return total


def render_prompt(loaded: LoadedModel, request: ChatCompletionRequest) -> str:
    """The chat-templated prompt text with one placeholder per media item."""
    templater = loaded.processor if loaded.processor is not None else loaded.tokenizer
    if getattr(templater, "chat_template", None) is None:
        raise InvalidRequest(
            f"model {loaded.model_id} has no chat template; it cannot serve chat completions"
        )
    try:
        text = templater.apply_chat_template(hf_messages(request), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises TemplateError, templates raise their own exceptions
        raise InvalidRequest(f"the model's chat template cannot render these messages: {exc}") from exc
    if isinstance(text, list):
        text = text[0]
    return str(text)


def check_modalities(loaded: LoadedModel, request: ChatCompletionRequest) -> None:
    """Refuse media this model family cannot take."""
    for item in request.media():
        if item.modality not in loaded.modalities:
            accepted = ", ".join(sorted(m.value for m in loaded.modalities)) or "none"
            raise InvalidRequest(
                f"model {loaded.model_id} ({loaded.model_type}) accepts media [{accepted}], but message "
                f"{item.message_index} part {item.part_index} is {item.modality.value}"
            )


def mm_token_types(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL's `mm_token_type_ids`: 0 text, 1 image placeholder, 2 video placeholder."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    image = loaded.placeholder_ids.get(Modality.IMAGE)
    video = loaded.placeholder_ids.get(Modality.VIDEO)
    if image is not None:
        types[input_ids == image] = 1
    if video is not None:
        types[input_ids == video] = 2
    return types


def positions(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    **rope_kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """Prefill position ids and the M-RoPE delta, as `generate` prepares them.

    `rope_kwargs` passes family extras through to `get_rope_index` (Qwen2.5-VL's `second_per_grid_ts`).
    """
    length = int(input_ids.shape[1])
    text_positions = torch.arange(length, dtype=torch.long).unsqueeze(0)
    if not loaded.mrope:
        return text_positions, 0
    if image_grid_thw is None and video_grid_thw is None:
        return text_positions.unsqueeze(0).expand(4, 1, length).clone(), 0
    inner = loaded.model.model if hasattr(loaded.model, "model") else loaded.model
    rope, deltas = inner.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_types(loaded, input_ids),
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        attention_mask=torch.ones_like(input_ids),
        **rope_kwargs,
    )
    return torch.cat([text_positions.unsqueeze(0), rope], dim=0), int(deltas.reshape(-1)[0].item())


def prepare_with_media(
    loaded: LoadedModel, request: ChatCompletionRequest, media: list[tuple[Modality, Any]]
) -> PreparedPrompt:
    """No fission: run the model's processor on the prompt and the decoded media (blocking)."""
    text = render_prompt(loaded, request)
    if loaded.processor is None:
        ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
        return PreparedPrompt(input_ids=ids, position_ids=positions(loaded, ids, None, None)[0])
    images = [m for kind, m in media if kind == Modality.IMAGE]
    videos = [m for kind, m in media if kind == Modality.VIDEO]
    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    try:
        batch = loaded.processor(**kwargs)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidRequest(f"the model's processor rejected the request's media: {exc}") from exc
    inputs = dict(batch)
    input_ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    extra = {k: inputs[k] for k in ("second_per_grid_ts",) if inputs.get(k) is not None}
    pos, delta = positions(
        loaded, input_ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"), **extra
    )
    return PreparedPrompt(input_ids=input_ids, position_ids=pos, rope_delta=delta, model_inputs=inputs)


@dataclass
class TemplatedPrompt:
    """An encoder-fission prompt tokenized before its embeddings arrive: one placeholder per media item.

    Rendering and tokenizing need only the request, so the executor does them while the encoder
    still works (`template_for_embeddings`); `splice_embeddings` then expands the k-th placeholder
    to its forward's `num_tokens` copies in token space. That equals tokenizing the expanded text,
    as the processor does: placeholders are added tokens, which the tokenizer splits off before
    anything else, so N copies in the text are N copies of the one id.
    """

    input_ids: torch.Tensor
    """`[L]` token ids with one placeholder token per media item."""
    placeholders: list[int]
    """Where each media item's placeholder is in `input_ids`, in order."""


def template_for_embeddings(loaded: LoadedModel, request: ChatCompletionRequest) -> TemplatedPrompt:
    """Encoder fission, before the embeddings: render the chat template and tokenize (blocking)."""
    media = request.media()
    if media and not loaded.placeholder_ids:
        raise InvalidRequest(f"model {loaded.model_id} has no media placeholder tokens")
    text = render_prompt(loaded, request)
    input_ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][0]
    placeholder_ids = torch.tensor(sorted(loaded.placeholder_ids.values()), dtype=input_ids.dtype)
    at = torch.isin(input_ids, placeholder_ids).nonzero().reshape(-1).tolist()
    if len(at) != len(media):
        raise InvalidRequest(
            f"the chat-templated prompt has {len(at)} media placeholder token(s) for {len(media)} media "
            "item(s) (does the text itself contain a media placeholder token?)"
        )
    return TemplatedPrompt(input_ids=input_ids, placeholders=at)


def _check_embeddings(
    loaded: LoadedModel, request: ChatCompletionRequest, received: list[ReceivedEmbedding]
) -> None:
    """Each forward matches its media item and the LLM (modality, shape, M-RoPE grid)."""
    media = request.media()
    if len(media) != len(received):
        raise InvalidRequest(
            f"the request has {len(media)} media item(s) but {len(received)} embedding forward(s)"
        )
    for index, (item, emb) in enumerate(zip(media, received, strict=True)):
        where = f"embedding forward {emb.forward_id} (media item {index})"
        if emb.meta.modality != item.modality:
            raise EmbeddingError(
                f"{where} carries {emb.meta.modality.value} but the item is {item.modality.value}"
            )
        if tuple(emb.tensor.shape) != (emb.meta.num_tokens, loaded.hidden_size):
            raise EmbeddingError(
                f"{where} has shape {list(emb.tensor.shape)}; expected [{emb.meta.num_tokens}, "
                f"{loaded.hidden_size}] (num_tokens from its metadata, the LLM's hidden size)"
            )
        if loaded.mrope:
            grid = emb.meta.grid_thw
            if grid is None or len(grid) != 3:
                raise EmbeddingError(f"{where} has no grid_thw, which {loaded.model_type} needs for M-RoPE")
            expected = grid[0] * grid[1] * grid[2] // (loaded.spatial_merge_size**2)
            if expected != emb.meta.num_tokens:
                raise EmbeddingError(
                    f"{where}: grid_thw {grid} means {expected} tokens but num_tokens is {emb.meta.num_tokens}"
                )


def splice_embeddings(
    loaded: LoadedModel,
    request: ChatCompletionRequest,
    templated: TemplatedPrompt,
    received: list[ReceivedEmbedding],
) -> PreparedPrompt:
    """Encoder fission, once the embeddings are in: expand each placeholder to its forward's rows."""
    _check_embeddings(loaded, request, received)
    ids = templated.input_ids
    modality_of = {token: modality for modality, token in loaded.placeholder_ids.items()}
    pieces: list[torch.Tensor] = []
    cursor = 0
    for count, (at, emb) in enumerate(zip(templated.placeholders, received, strict=True)):
        token = int(ids[at])
        if modality_of.get(token) != emb.meta.modality:
            found = modality_of[token].value if token in modality_of else "unknown"
            raise EmbeddingError(
                f"embedding forward {emb.forward_id} is {emb.meta.modality.value} but the prompt's "
                f"placeholder {count} is {found}"
            )
        pieces.append(ids[cursor:at])
        pieces.append(ids[at : at + 1].expand(emb.meta.num_tokens))
        cursor = at + 1
    pieces.append(ids[cursor:])
    input_ids = torch.cat(pieces).unsqueeze(0)
    placeholder_ids = torch.tensor(sorted(loaded.placeholder_ids.values()), dtype=input_ids.dtype)
    mask = torch.isin(input_ids[0], placeholder_ids)
    embeds = torch.cat([e.tensor for e in received], dim=0) if received else None
    image_grids = [e.meta.grid_thw for e in received if e.meta.modality == Modality.IMAGE and e.meta.grid_thw]
    video_grids = [e.meta.grid_thw for e in received if e.meta.modality == Modality.VIDEO and e.meta.grid_thw]
    extra: dict[str, Any] = {}
    video_seconds = [e.meta.second_per_grid_t for e in received if e.meta.modality == Modality.VIDEO]
    if loaded.model_type == "qwen2_5_vl" and video_seconds and all(s is not None for s in video_seconds):
        extra["second_per_grid_ts"] = torch.tensor(video_seconds, dtype=torch.float32)
    pos, delta = positions(
        loaded,
        input_ids,
        torch.tensor(image_grids, dtype=torch.long) if image_grids else None,
        torch.tensor(video_grids, dtype=torch.long) if video_grids else None,
        **extra,
    )
    return PreparedPrompt(
        input_ids=input_ids,
        position_ids=pos,
        rope_delta=delta,
        media_embeds=embeds,
        media_positions=mask.nonzero().reshape(-1) if embeds is not None else None,
    )
