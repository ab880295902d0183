"""The Thinker-Talker example app end to end: gateway → dispatcher → thinker executor → sidecar stream → talker.

`examples/thinker_talker_app.py` is registered unchanged on a whole local cluster (2 CPU slots) with
the tiny `qwen2-thinker` / `qwen2-talker` checkpoints; its streamed talker tokens must equal the
in-process transformers reference token for token (`cornserve.models.thinker_talker`: thinker
`generate` with hidden states, then the talker on them). Its own cluster, so it is marked `slow`.

The order "the talker's first token was made before the thinker finished" is read from events, not
timings: the thinker sends through a `StreamWriter` with a window of `WINDOW` chunks (one hidden
state each), so its answer (which waits until every state was sent) cannot come before the talker
has read all but `WINDOW` of them; the talker's first item says it was made after reading only
`inputs_received` states, fewer than that, so it came first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.cluster import gateway_session, running_local_cluster
from tests.support.plugin import TinyCheckpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from cornserve.cli.launcher import LocalCluster
from cornserve.models.thinker_talker import chat_prompt_ids, talker_reference, thinker_reference
from cornserve.task.builtins import ThinkerTask

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "thinker_talker_app.py"
PROMPT = "Describe a cat on a red chair."
THINKER_TOKENS = 40
TALKER_MAX_TOKENS = 256
"""What the example gives `ThinkerTalkerTask(talker_max_tokens=...)`."""
WINDOW = ThinkerTask.model_fields["stream_window"].default
"""The example's thinker keeps at most this many chunks (one hidden state each) unread by the talker."""


@pytest.fixture(scope="module")
def models(tiny_checkpoint: TinyCheckpoint) -> tuple[Path, Path]:
    return tiny_checkpoint("qwen2-thinker"), tiny_checkpoint("qwen2-talker")


@pytest.fixture(scope="module")
def cluster(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The example reads its model ids from the environment of `cornserve up` (the gateway runs it)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CORNSERVE_THINKER_MODEL", str(models[0]))
        env.setenv("CORNSERVE_TALKER_MODEL", str(models[1]))
        with running_local_cluster(tmp_path_factory.mktemp("thinker-talker"), cpu_slots=2) as local:
            yield local


def _reference(models: tuple[Path, Path]) -> tuple[list[int], list[int], str]:
    thinker = AutoModelForCausalLM.from_pretrained(models[0]).eval()
    talker = AutoModelForCausalLM.from_pretrained(models[1]).eval()
    ids = chat_prompt_ids(AutoTokenizer.from_pretrained(models[0]), PROMPT)
    thought = thinker_reference(thinker, ids, THINKER_TOKENS)
    eos = talker.generation_config.eos_token_id
    talked = talker_reference(
        talker, thought.hidden_states, TALKER_MAX_TOKENS, set(eos if isinstance(eos, list) else [eos])
    )
    return thought.token_ids, talked.token_ids, talked.finish_reason


async def test_the_example_app_talks_exactly_like_the_in_process_reference(
    cluster: LocalCluster, models: tuple[Path, Path]
) -> None:
    thinker_tokens, talker_tokens, finish = _reference(models)
    async with gateway_session(cluster, timeout_s=600) as gateway:
        async with gateway.post(
            "/apps", json={"name": "thinker-talker", "source": EXAMPLE.read_text()}
        ) as resp:
            registered = await resp.json()
            assert resp.status == 201, registered
        keys = sorted(t["key"].split("-")[0] for t in registered["tasks"])
        assert keys == ["talkertask", "thinkertask"], registered["tasks"]
        request = {"prompt": PROMPT, "max_tokens": THINKER_TOKENS}
        items: list[dict[str, Any]] = []
        async with gateway.post("/apps/thinker-talker/invoke", json=request) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if line.strip():
                    item = json.loads(line)
                    assert "error" not in item, item
                    items.append(item)
    assert [i["token_id"] for i in items if i["token_id"] is not None] == talker_tokens
    assert items[-1]["finish_reason"] == finish
    assert [i["index"] for i in items] == list(range(len(items)))
    first = items[0]
    assert not first["inputs_complete"]
    # The thinker could answer only after the talker had read at least N - WINDOW states; the
    # talker's first token was made after reading fewer.
    assert first["inputs_received"] < len(thinker_tokens) - WINDOW, (first, len(thinker_tokens))
