"""The encoder-fission prompt, tokenized before the embeddings arrive and expanded in token space.

`template_for_embeddings` + `splice_embeddings` must give exactly the ids the processor's way
gives (each placeholder repeated `num_tokens` times in the text, then tokenized), on every family
and mix of media; checked here in process on the tiny checkpoints (the executors' answers against
`generate` are checked in test_llm_executor.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cornserve.llm_executor.embeddings import ReceivedEmbedding
from cornserve.llm_executor.errors import EmbeddingError, InvalidRequest
from cornserve.llm_executor.model import LoadedModel, load_model
from cornserve.llm_executor.prompt import render_prompt, splice_embeddings, template_for_embeddings
from cornserve.task.builtins.chat import ChatCompletionRequest
from cornserve.task.builtins.embedding import EmbeddingMeta
from cornserve.task.builtins.modality import Modality

_loaded: dict[str, LoadedModel] = {}


def model(tiny_models: dict[str, Path], arch: str) -> LoadedModel:
    if arch not in _loaded:
        _loaded[arch] = load_model(str(tiny_models[arch]))
    return _loaded[arch]


def request_of(modalities: list[str], text: str) -> ChatCompletionRequest:
    parts: list[dict[str, object]] = [
        {"type": f"{m}_url", f"{m}_url": {"url": f"data:,{i}"}} for i, m in enumerate(modalities)
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [*parts, {"type": "text", "text": text}]},
    ]
    return ChatCompletionRequest.model_validate({"messages": messages})


def embeddings_for(loaded: LoadedModel, modalities: list[str]) -> list[ReceivedEmbedding]:
    out = []
    for index, name in enumerate(modalities):
        grid = [2, 4, 6] if name == "video" else [1, 4 + 2 * index, 6]
        rows = grid[0] * grid[1] * grid[2] // (loaded.spatial_merge_size**2) if loaded.mrope else 5 + index
        meta = EmbeddingMeta(
            modality=Modality(name), num_tokens=rows, grid_thw=grid if loaded.mrope else None, dtype="float32"
        )
        out.append(ReceivedEmbedding(f"f{index}", meta, torch.randn(rows, loaded.hidden_size)))
    return out


def processor_way(
    loaded: LoadedModel, request: ChatCompletionRequest, received: list[ReceivedEmbedding]
) -> torch.Tensor:
    """Each placeholder repeated in the text, then the whole text tokenized (what the processor does)."""
    pattern = "|".join(re.escape(token) for token in loaded.placeholder_tokens.values())
    rows = iter(received)
    text = re.sub(
        pattern, lambda found: found.group(0) * next(rows).meta.num_tokens, render_prompt(loaded, request)
    )
    ids: torch.Tensor = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    return ids


@pytest.mark.parametrize(
    ("arch", "modalities"),
    [
        ("qwen2-vl", ["image"]),
        ("qwen2-vl", ["video"]),
        ("qwen2-vl", ["image", "video", "image"]),
        ("qwen2-vl", []),
        ("llava", ["image"]),
        ("llava", ["image", "image"]),
    ],
)
def test_spliced_ids_equal_tokenizing_the_expanded_text(
    tiny_models: dict[str, Path], arch: str, modalities: list[str]
) -> None:
    loaded = model(tiny_models, arch)
    request = request_of(modalities, "What is shown? Answer in one word, then explain.")
    received = embeddings_for(loaded, modalities)
    templated = template_for_embeddings(loaded, request)
    assert len(templated.placeholders) == len(modalities)
    prompt = splice_embeddings(loaded, request, templated, received)
    assert torch.equal(prompt.input_ids, processor_way(loaded, request, received))
    rows = sum(e.meta.num_tokens for e in received)
    if modalities:
        assert prompt.media_positions is not None and prompt.media_embeds is not None
        assert len(prompt.media_positions) == rows == prompt.media_embeds.shape[0]
        assert torch.equal(prompt.media_embeds, torch.cat([e.tensor for e in received]))
    else:
        assert prompt.media_positions is None and prompt.media_embeds is None


def test_a_placeholder_token_in_the_text_is_refused_before_any_embedding_is_needed(
    tiny_models: dict[str, Path],
) -> None:
    loaded = model(tiny_models, "qwen2-vl")
    token = loaded.placeholder_tokens[Modality.IMAGE]
    with pytest.raises(InvalidRequest, match="2 media placeholder token"):
        template_for_embeddings(loaded, request_of(["image"], f"What about {token}?"))


def test_embeddings_that_do_not_match_the_items_are_refused(tiny_models: dict[str, Path]) -> None:
    loaded = model(tiny_models, "qwen2-vl")
    request = request_of(["image", "video"], "Compare.")
    templated = template_for_embeddings(loaded, request)
    swapped = list(reversed(embeddings_for(loaded, ["image", "video"])))
    with pytest.raises(EmbeddingError, match="carries video but the item is image"):
        splice_embeddings(loaded, request, templated, swapped)
    one = embeddings_for(loaded, ["image"])
    with pytest.raises(InvalidRequest, match="2 media item"):
        splice_embeddings(loaded, request, templated, one)
