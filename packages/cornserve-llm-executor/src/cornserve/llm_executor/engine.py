"""The step-level scheduler: iteration-level batching over per-sequence KV caches.

One asyncio task owns the model. Each step it admits waiting sequences (up to
`max_batch_size` active), then runs one model step for every active sequence in a worker
thread: a prefill for a new sequence, one decode token for the others. Requests that arrive
while a step runs join at the next step, so concurrent requests are served together rather
than one after another. Every sequence keeps its own `DynamicCache` and its own positions, so
its tokens are exactly what it would get alone (greedy output equals transformers' `generate`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from cornserve.llm_executor.errors import ExecutorUnavailable, GenerationFailed
from cornserve.llm_executor.model import LoadedModel
from cornserve.llm_executor.prompt import PreparedPrompt
from cornserve.llm_executor.sampling import SamplingParams, select_token

logger = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """A generated token; `finish_reason` is set on the sequence's last event ("stop"/"length")."""

    token_id: int | None
    finish_reason: str | None = None


@dataclass
class EngineStats:
    """Counters a test or operator can read from `/stats`."""

    steps: int = 0
    sequences_started: int = 0
    sequences_finished: int = 0
    max_batch_size_observed: int = 0
    active: int = 0
    waiting: int = 0


@dataclass(eq=False)
class Sequence:
    """One request's generation state."""

    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams
    max_tokens: int
    events: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    cache: Any = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        """Stop generating (client went away or a stop string was hit); the engine drops it next step."""
        self.cancelled = True


class Engine:
    """Runs sequences on one model with iteration-level batching."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.stats = EngineStats()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._model_lock = threading.Lock()

    def start(self) -> None:
        """Start the scheduler task on the running loop."""
        self._task = asyncio.create_task(self._run(), name="llm-engine")

    async def close(self) -> None:
        """Stop the scheduler; unfinished sequences get an ExecutorUnavailable error."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        for seq in [*self._active, *self._waiting]:
            self._fail(seq, ExecutorUnavailable("the LLM executor is shutting down"))
        self._active.clear()
        self._waiting.clear()

    def submit(
        self, request_id: str, prompt: PreparedPrompt, params: SamplingParams, max_tokens: int
    ) -> Sequence:
        """Queue a sequence; read its tokens with `tokens(seq)`."""
        if self._closing:
            raise ExecutorUnavailable("the LLM executor is shutting down")
        seq = Sequence(request_id=request_id, prompt=prompt, params=params, max_tokens=max_tokens)
        seq.generator = params.make_generator()
        self._waiting.append(seq)
        self.stats.waiting = len(self._waiting)
        self._wake.set()
        return seq

    async def tokens(self, seq: Sequence, timeout_s: float) -> AsyncIterator[TokenEvent]:
        """The sequence's token events; each must arrive within `timeout_s` (a stuck engine is an error)."""
        while True:
            try:
                event = await asyncio.wait_for(seq.events.get(), timeout_s)
            except TimeoutError:
                seq.cancel()
                raise GenerationFailed(
                    f"no token for request {seq.request_id} within {timeout_s:.0f}s"
                ) from None
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    # ------------------------------------------------------------------ scheduler

    async def _run(self) -> None:
        while not self._closing:
            self._active = [s for s in self._active if not s.cancelled and not s.finished]
            while self._waiting and len(self._active) < self.max_batch_size:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    self._active.append(seq)
                    self.stats.sequences_started += 1
            self.stats.waiting = len(self._waiting)
            self.stats.active = len(self._active)
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._active)
            self.stats.steps += 1
            self.stats.max_batch_size_observed = max(self.stats.max_batch_size_observed, len(batch))
            results = await asyncio.to_thread(self._step, batch)
            for seq, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    self._fail(seq, result)
                else:
                    self._deliver(seq, result)

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.cache = None
        self.stats.sequences_finished += 1
        seq.events.put_nowait(exc)

    def _deliver(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        finish: str | None = None
        if token in self.loaded.eos_token_ids:
            finish = "stop"
        elif len(seq.generated) >= seq.max_tokens:
            finish = "length"
        if finish is not None:
            seq.finished = True
            seq.cache = None
            self.stats.sequences_finished += 1
        seq.events.put_nowait(TokenEvent(token_id=token, finish_reason=finish))

    # ------------------------------------------------------------------ model steps (worker thread)

    def _step(self, batch: list[Sequence]) -> list[int | BaseException]:
        out: list[int | BaseException] = []
        with self._model_lock, torch.inference_mode():
            for seq in batch:
                try:
                    logits = self._prefill(seq) if seq.cache is None else self._decode(seq)
                    out.append(select_token(logits, seq.params, seq.generator))
                except Exception as exc:
                    logger.exception("generation failed for request %s", seq.request_id)
                    out.append(GenerationFailed(f"generation failed for request {seq.request_id}: {exc!r}"))
        return out

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        loaded, prompt = self.loaded, seq.prompt
        seq.cache = DynamicCache(config=loaded.model.config.get_text_config())
        kwargs: dict[str, Any] = dict(prompt.model_inputs)
        if prompt.media_embeds is not None and prompt.media_positions is not None:
            embeds = loaded.input_embeddings(prompt.input_ids).clone()
            embeds[0, prompt.media_positions] = prompt.media_embeds.to(embeds.dtype)
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = prompt.input_ids
        kwargs.update(
            attention_mask=torch.ones_like(prompt.input_ids),
            position_ids=prompt.position_ids,
            cache=seq.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        result = loaded.model(**kwargs)
        # Media tensors are not needed after prefill.
        prompt.model_inputs = {}
        prompt.media_embeds = None
        logits: torch.Tensor = result.logits[0, -1]
        return logits

    def _decode(self, seq: Sequence) -> torch.Tensor:
        prompt = seq.prompt
        past = prompt.num_tokens + len(seq.generated) - 1
        input_ids = torch.tensor([[seq.generated[-1]]], dtype=torch.long)
        if self.loaded.mrope:
            rope = past + prompt.rope_delta
            position_ids = torch.tensor([[[past]], [[rope]], [[rope]], [[rope]]], dtype=torch.long)
        else:
            position_ids = torch.tensor([[past]], dtype=torch.long)
        result = self.loaded.model(
            input_ids=input_ids,
            attention_mask=torch.ones((1, past + 1), dtype=torch.long),
            position_ids=position_ids,
            cache=seq.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = result.logits[0, -1]
        return logits
