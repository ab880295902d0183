"""Tiny thinker and talker checkpoints, and the in-process Thinker-Talker reference."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tests.support.plugin import TinyCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from cornserve.cli.main import main as cli_main
from cornserve.models.thinker_talker import (
    chat_prompt_ids,
    talker_reference,
    talker_step_input,
    thinker_reference,
)
from cornserve.models.tiny import (
    ALL_TINY_ARCHITECTURES,
    SINGLE_FILE,
    TINY_TEXT_ARCHITECTURES,
    UnknownArchitectureError,
    build_tiny,
)


@pytest.fixture(scope="module")
def pair(tiny_checkpoint: TinyCheckpoint) -> tuple[Path, Path]:
    return tiny_checkpoint("qwen2-thinker"), tiny_checkpoint("qwen2-talker")


def _load(path: Path) -> torch.nn.Module:
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path).eval()
    return model


def test_text_architectures_are_known() -> None:
    assert set(TINY_TEXT_ARCHITECTURES) == {"qwen2-thinker", "qwen2-talker"}
    assert set(TINY_TEXT_ARCHITECTURES) <= set(ALL_TINY_ARCHITECTURES)
    with pytest.raises(UnknownArchitectureError) as info:
        build_tiny("qwen2-speaker", Path("/nonexistent"))
    assert "qwen2-talker" in str(info.value)


def test_layout_and_widths(pair: tuple[Path, Path]) -> None:
    thinker_dir, talker_dir = pair
    for d in pair:
        for name in (
            "config.json",
            "generation_config.json",
            SINGLE_FILE,
            "tokenizer.json",
            "chat_template.jinja",
        ):
            assert (d / name).is_file(), f"{d.name} lacks {name}"
    thinker, talker = _load(thinker_dir), _load(talker_dir)
    assert talker.config.thinker_hidden_size == thinker.config.hidden_size == talker.config.hidden_size
    assert talker.config.num_hidden_layers != thinker.config.num_hidden_layers  # a different network
    assert AutoTokenizer.from_pretrained(thinker_dir).chat_template is not None


def test_same_seed_same_bytes(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    again = build_tiny("qwen2-talker", tmp_path / "talker")
    digest = [hashlib.sha256((d / SINGLE_FILE).read_bytes()).hexdigest() for d in (pair[1], again)]
    assert digest[0] == digest[1]


def test_thinker_reference_hidden_states_are_the_last_layer_of_each_token(pair: tuple[Path, Path]) -> None:
    """Token k's hidden state equals a plain forward's last layer at the position that predicted it."""
    thinker = _load(pair[0])
    ids = chat_prompt_ids(AutoTokenizer.from_pretrained(pair[0]), "Describe a cat on a chair.")
    ref = thinker_reference(thinker, ids, max_new_tokens=12)
    assert len(ref.token_ids) == ref.hidden_states.shape[0] >= 1
    full = torch.cat([ids, torch.tensor([ref.token_ids])], dim=1)
    with torch.inference_mode():
        out = thinker(input_ids=full, output_hidden_states=True)
    start = ids.shape[1] - 1
    expected = out.hidden_states[-1][0, start : start + len(ref.token_ids)]
    torch.testing.assert_close(ref.hidden_states, expected, rtol=1e-4, atol=1e-5)
    assert [int(t) for t in out.logits[0, start : start + len(ref.token_ids)].argmax(-1)] == ref.token_ids


def test_talker_reference_equals_an_incremental_cached_run(pair: tuple[Path, Path]) -> None:
    """The cache-free reference and a KV-cached step-by-step run agree token for token."""
    thinker, talker = _load(pair[0]), _load(pair[1])
    ids = chat_prompt_ids(AutoTokenizer.from_pretrained(pair[0]), "What is in the picture?")
    hidden = thinker_reference(thinker, ids, max_new_tokens=20).hidden_states
    ref = talker_reference(talker, hidden, max_tokens=100, eos_token_ids=())
    assert ref.finish_reason == "stop" and len(ref.token_ids) == hidden.shape[0]
    cache = DynamicCache(config=talker.config)
    tokens: list[int] = []
    with torch.inference_mode():
        for t in range(hidden.shape[0]):
            prev = talker.get_input_embeddings()(torch.tensor([tokens[-1]]))[0] if tokens else None
            x = talker_step_input(hidden[t], prev).view(1, 1, -1)
            out = talker(inputs_embeds=x, position_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    assert tokens == ref.token_ids
    short = talker_reference(talker, hidden, max_tokens=3, eos_token_ids=())
    assert short == type(short)(ref.token_ids[:3], "length")
    stop_at = ref.token_ids[4]
    eos = talker_reference(talker, hidden, max_tokens=100, eos_token_ids={stop_at})
    assert eos.finish_reason == "stop" and eos.token_ids == ref.token_ids[: ref.token_ids.index(stop_at) + 1]


def test_cli_builds_the_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for arch in TINY_TEXT_ARCHITECTURES:
        assert cli_main(["models", "tiny", arch, str(tmp_path / arch)]) == 0
        assert (tmp_path / arch / SINGLE_FILE).is_file()
    assert cli_main(["models", "tiny", "qwen2-speaker", str(tmp_path / "n")]) == 2
    assert "qwen2-talker" in capsys.readouterr().err
