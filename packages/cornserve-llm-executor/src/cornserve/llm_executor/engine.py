"""The step-level scheduler: iteration-level batching with one batched forward per decode step.

One asyncio task owns the model. Each step it admits waiting sequences (up to
`max_batch_size` active), then (in a worker thread, or on the loop: below) prefills every new
sequence (one forward each: their media differ) and decodes one token for all the others in ONE
forward over a left-padded batched KV cache (`batch_cache.BatchedDecodeCache`). Requests that
arrive while a step runs join at the next step, so concurrent requests share the model's forwards
and throughput rises with concurrency. Each row keeps its own positions (M-RoPE included) and the
attention mask hides its padding, so a sequence's tokens are what it would get alone (greedy
output equals transformers' `generate`). `decode_batching=False` decodes each sequence in its
own forward (the escape hatch `--decode-batching off`).

Two roles beyond chat (docs/executors.md, "Thinker and talker"): a sequence with a `hidden_sink`
(thinker) gets each token's last-layer hidden state handed to it with the token; a sequence with a
`feed` (talker) generates one token per input row of its feed (`cornserve.models.thinker_talker`
has the rule), is stepped only when its next row has arrived, and decodes in a forward of its own
(its inputs are embeddings, not the batch's token ids).

Where a step runs (`Engine.inline_step_budget_s`): on a CUDA device every step runs in a worker
thread (the forward waits on the GPU without the GIL, and the loop keeps writing chunks and
answering meanwhile), and so it does on the CPU with several torch threads (measured: batched
decode of concurrent requests was slower inline, its kernels' pool and the loop's Python work no
longer overlapping). On the CPU with one torch thread (the executor on one CPU slot, whose
`OMP_NUM_THREADS` is 1) a step without a prefill runs **inline on the event loop** when
the previous such step took less than the budget (CPython's GIL switch interval, 5 ms): a step that
short holds the GIL for most of its length anyway, so the loop could do little during it, while
handing it to a worker thread and back (pool submit, the self-pipe wake-up, two GIL hand-overs)
cost ~0.2 ms per token, a third of a tiny model's step. After an inline step the scheduler lets
the loop run a few iterations (`YIELDS_BETWEEN_STEPS`), so the step's tokens are written, new
requests are read and join at the next step, cancellations apply and `/health` is answered
between any two steps. So it does after a step in the worker thread when inline steps are
possible: without it, the first token of a prefill run there waited in its queue while the first
decode step ran inline, one decode step more of every request's time to first token. Steps after
one that took longer than the budget go to the worker thread: a decode step blocks the loop for
longer than the budget only when it is the first to grow past it (the batch or the context grew).

A step with prefills runs inline too when they are prompts of tokens or received embeddings
predicted short (`Engine.prefill_cost`: the latest such prefill's seconds per prompt token, as
`cornserve.models.inline.InlineCost` predicts) and the prediction, plus the latest decode step's
time when the step also decodes, is within the budget. The first such prefill runs on the thread
(nothing is known yet). Against every prefill in the thread, for an encoder-fission prompt on the
tiny Qwen2-VL this took 0.6-1.7 ms off the time to the last token in three paired runs (the time
to first token moved by -0.7 to +0.6 ms). A prefill that runs the model's own media encoder (pixel
values: no fission) always goes to the thread: on the loop its time to first token measured
0.35 ms *longer* (docs/performance.md, "Short prefills on the event loop").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from transformers import DynamicCache

from cornserve.llm_executor import batch_cache
from cornserve.llm_executor.batch_cache import BatchedDecodeCache
from cornserve.llm_executor.errors import ExecutorOverloaded, ExecutorUnavailable, GenerationFailed
from cornserve.llm_executor.input_embeds import InputEmbedsFeed
from cornserve.llm_executor.metrics import TPOT, TTFT
from cornserve.llm_executor.model import LoadedModel
from cornserve.llm_executor.prompt import PreparedPrompt
from cornserve.llm_executor.sampling import SamplingParams, select_token
from cornserve.models.inline import InlineCost, inline_budget_s
from cornserve.models.thinker_talker import talker_step_input

logger = logging.getLogger(__name__)


YIELDS_BETWEEN_STEPS = 8
"""Event-loop iterations run between two inline steps (module docstring).

One iteration polls the sockets and runs what is ready: the step's tokens' handlers write them, new
requests are read, cancellations apply. But an HTTP exchange is a chain of callbacks, one iteration
each, so with one iteration per step a `/health` during a generation took ~6x as long as with the
steps in the worker thread; with 8 it takes as long, and the 7 extra iterations cost ~0.03 ms per
step when nothing is ready (docs/performance.md, "LLM executor steps on the event loop").
"""


async def _yield_to_loop() -> None:
    """Let the event loop run `YIELDS_BETWEEN_STEPS` iterations between two inline steps."""
    for _ in range(YIELDS_BETWEEN_STEPS):
        await asyncio.sleep(0)


Forwarded = tuple[torch.Tensor, torch.Tensor | None]
"""One sequence's step output: its `[vocab]` logits and, for a thinker, its `[hidden]` last-layer state."""
StepResult = tuple[int, torch.Tensor | None]
"""The token picked and the hidden state that produced it (None unless the sequence wants it)."""


def _needs_prefill(seq: Sequence) -> bool:
    """Whether the sequence's next step is its prefill (a talker has none: it steps from its feed)."""
    return not seq.prefilled and seq.feed is None


def _row_of(logits: torch.Tensor, hidden: torch.Tensor | None, row: int, seq: Sequence) -> Forwarded:
    """Row `row` of a batched forward's `[B, vocab]` logits (and `[B, hidden]` states) (for `Engine._guarded`)."""
    return logits[row], (hidden[row] if hidden is not None and seq.hidden_sink is not None else None)


def _last_hidden(result: Any, want: bool) -> torch.Tensor | None:
    """`[B, hidden]` last-layer states at each row's last position, copied out (None if not asked for)."""
    if not want:
        return None
    states: torch.Tensor = result.hidden_states[-1][:, -1]
    return states.detach().to(torch.float32).clone()


@dataclass
class TokenEvent:
    """A generated token; `finish_reason` is set on the sequence's last event ("stop"/"length")."""

    token_id: int | None
    finish_reason: str | None = None
    inputs_received: int = 0
    """Talker: input rows read when this token was made."""
    inputs_complete: bool = False
    """Talker: whether the input stream had ended when this token was made."""


@dataclass
class EngineStats:
    """Counters a test or operator can read from `/stats`."""

    steps: int = 0
    sequences_started: int = 0
    sequences_finished: int = 0
    max_batch_size_observed: int = 0
    decode_forwards: int = 0
    """Model forwards that decoded tokens (one per step when decode batching is on)."""
    max_decode_batch_observed: int = 0
    """The most sequences decoded by a single forward."""
    tokens_generated: int = 0
    active: int = 0
    """Sequences being generated now (a cancelled one stops counting at the next step)."""
    waiting: int = 0
    inline_steps: int = 0
    """Steps run on the event loop instead of the worker thread (CPU, short steps: module docstring)."""
    inline_prefills: int = 0
    """Prefills among them (of tokens or received embeddings, predicted short: module docstring)."""
    sequences_cancelled: int = 0
    """Sequences dropped unfinished: their caller hung up (or a stop string ended them)."""


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
    """This sequence's own `DynamicCache` (until it joins the batched decode cache)."""
    prefilled: bool = False
    generator: torch.Generator | None = None
    cancelled: bool = False
    finished: bool = False
    last_event_at: float = field(default_factory=time.monotonic)
    """When it arrived, then when its latest token was made (for TTFT and time per output token)."""
    hidden_sink: Callable[[torch.Tensor], None] | None = None
    """Thinker: called on the event loop with each token's `[hidden]` state, before the token's event."""
    feed: InputEmbedsFeed | None = None
    """Talker: the streamed input rows this sequence generates from (one token per row)."""

    @property
    def ready(self) -> bool:
        """Whether a step can run now: always for chat; for a talker, once its next input row is here."""
        return self.feed is None or self.feed.received > len(self.generated)

    def cancel(self) -> None:
        """Stop generating (client went away or a stop string was hit); the engine drops it next step."""
        self.cancelled = True


ENCODER_INPUTS = ("pixel_values", "pixel_values_videos", "input_features")
"""Processor outputs the model encodes during a prefill (images, videos, audio): a media prefill."""


def encodes_media(prompt: PreparedPrompt) -> bool:
    """Whether the prompt's prefill runs the model's own media encoder (no fission); read before the prefill."""
    return any(key in prompt.model_inputs for key in ENCODER_INPUTS)


class Engine:
    """Runs sequences on one model with iteration-level batching."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int,
        *,
        decode_batching: bool = True,
        max_waiting: int = 256,
        inline_step_budget_s: float | None = None,
    ) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        """Sequences that may wait for a batch slot; `submit` refuses more (429) instead of queueing them."""
        self.decode_batching = decode_batching
        self._batch = BatchedDecodeCache()
        """Touched only by `_step` (on one thread at a time) and while no step runs."""
        self.stats = EngineStats()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._model_lock = threading.Lock()
        if inline_step_budget_s is None:
            inline_step_budget_s = inline_budget_s(loaded.device)
        self.inline_step_budget_s = inline_step_budget_s
        """A step without a prefill runs on the loop when the previous one took less (0: never; module docstring)."""
        self._last_step_s: float | None = None
        """How long the latest step without a prefill took (None until one ran)."""
        self.prefill_cost = InlineCost(inline_step_budget_s)
        """What prefills of tokens or received embeddings took per prompt token (module docstring)."""

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

    def check_room(self) -> None:
        """Raise ExecutorOverloaded if a new sequence would not fit in the waiting queue now."""
        free_slots = self.max_batch_size - len(self._active)
        waiting = len(self._waiting)
        if waiting - max(free_slots, 0) >= self.max_waiting:
            raise ExecutorOverloaded(
                f"{waiting} request(s) are waiting for a batch slot, the limit is {self.max_waiting} "
                "(--max-waiting); retry later"
            )

    def submit(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        params: SamplingParams,
        max_tokens: int,
        *,
        hidden_sink: Callable[[torch.Tensor], None] | None = None,
        feed: InputEmbedsFeed | None = None,
    ) -> Sequence:
        """Queue a sequence; read its tokens with `tokens(seq)`. Raises ExecutorOverloaded when the queue is full."""
        if self._closing:
            raise ExecutorUnavailable("the LLM executor is shutting down")
        self.check_room()
        seq = Sequence(
            request_id=request_id,
            prompt=prompt,
            params=params,
            max_tokens=max_tokens,
            hidden_sink=hidden_sink,
            feed=feed,
        )
        seq.generator = params.make_generator()
        self._waiting.append(seq)
        self.stats.waiting = len(self._waiting)
        self._wake.set()
        return seq

    def wake(self) -> None:
        """Something a waiting sequence needs arrived (a talker's input row): run a step."""
        self._wake.set()

    async def tokens(self, seq: Sequence, timeout_s: float) -> AsyncIterator[TokenEvent]:
        """The sequence's token events; each must arrive within `timeout_s` (a stuck engine is an error)."""
        while True:
            try:
                # An event already queued is taken at once; otherwise wait under a deadline scope
                # (not `wait_for`, which wraps every wait in a new task: per token on the loop
                # thread, whose time the model's thread competes with for the GIL).
                if seq.events.empty():
                    async with asyncio.timeout(timeout_s):
                        event = await seq.events.get()
                else:
                    event = seq.events.get_nowait()
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
            self._active = [s for s in self._active if not self._dropped(s)]
            while self._waiting and len(self._active) < self.max_batch_size:
                seq = self._waiting.popleft()
                if not self._dropped(seq):
                    self._active.append(seq)
                    self.stats.sequences_started += 1
            self._settle_feeds()
            self._active = [s for s in self._active if not s.finished]
            self.stats.waiting = len(self._waiting)
            self.stats.active = len(self._active)
            if not self._active:
                self._batch.clear()  # no step is running: free finished rows' memory
            batch = [s for s in self._active if s.ready]
            if not batch:  # nothing active, or only talkers waiting for their next input row
                self._wake.clear()
                await self._wake.wait()
                continue
            self.stats.steps += 1
            self.stats.max_batch_size_observed = max(self.stats.max_batch_size_observed, len(batch))
            inline = self._runs_inline(batch)
            if inline:
                self.stats.inline_steps += 1
                results = self._step(batch, inline=True)
            else:
                results = await asyncio.to_thread(self._step, batch)
            for seq, result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    self._fail(seq, result)
                else:
                    self._deliver(seq, result)
            if self.inline_step_budget_s > 0:
                # What /stats and /metrics say is current before the loop answers anyone; then the
                # step's tokens reach their streams before the next step, which may hold the loop
                # (inline): after a step in the worker thread too, or the first token of a prefill
                # there waited for the next decode step (module docstring). Without a budget every
                # step runs in the thread and the loop's writes overlap the next one instead.
                self._active = [s for s in self._active if not s.finished]
                self.stats.active = len(self._active)
                await _yield_to_loop()

    def _runs_inline(self, batch: list[Sequence]) -> bool:
        """Whether this step runs on the loop: its prefills and decode predicted within the budget.

        The decode part is predicted by the latest step without a prefill, the prefills by
        `prefill_cost`; a part never measured, or a prefill that encodes media, sends the step to
        the worker thread.
        """
        if self.inline_step_budget_s <= 0:
            return False
        predicted = 0.0
        prefills = [seq.prompt for seq in batch if _needs_prefill(seq)]
        if len(prefills) < len(batch):  # the step decodes too
            if self._last_step_s is None:
                return False
            predicted += self._last_step_s
        if prefills:
            prefill_s = self.prefill_cost.predict_s(sum(prompt.num_tokens for prompt in prefills))
            if prefill_s is None or any(encodes_media(prompt) for prompt in prefills):
                return False
            predicted += prefill_s
        return predicted < self.inline_step_budget_s

    def _settle_feeds(self) -> None:
        """Talkers whose input failed fail; those whose input ended (and is used up) finish with "stop"."""
        for seq in self._active:
            feed = seq.feed
            if feed is None or seq.finished or seq.ready:
                continue
            if feed.error is not None:
                self._fail(seq, feed.error)
            elif feed.closed:
                seq.finished = True
                seq.cache = None
                self.stats.sequences_finished += 1
                seq.events.put_nowait(
                    TokenEvent(None, "stop", inputs_received=feed.received, inputs_complete=True)
                )

    def _dropped(self, seq: Sequence) -> bool:
        """Whether `seq` leaves the scheduler now: finished, or cancelled (then counted and freed)."""
        if seq.finished:
            return True
        if not seq.cancelled:
            return False
        seq.finished = True
        seq.cache = None
        self.stats.sequences_cancelled += 1
        return True

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if seq.finished:
            return
        seq.finished = True
        seq.cache = None
        self.stats.sequences_finished += 1
        seq.events.put_nowait(exc)

    def _deliver(self, seq: Sequence, result: StepResult) -> None:
        token, hidden = result
        if hidden is not None and seq.hidden_sink is not None:
            seq.hidden_sink(hidden)
        now = time.monotonic()
        (TPOT if seq.generated else TTFT).observe(now - seq.last_event_at)
        seq.last_event_at = now
        seq.generated.append(token)
        self.stats.tokens_generated += 1
        finish: str | None = None
        if token in self.loaded.eos_token_ids:
            finish = "stop"
        elif len(seq.generated) >= seq.max_tokens:
            finish = "length"
        if finish is not None:
            seq.finished = True
            seq.cache = None
            self.stats.sequences_finished += 1
        event = TokenEvent(token_id=token, finish_reason=finish)
        if seq.feed is not None:
            event.inputs_received, event.inputs_complete = seq.feed.received, seq.feed.closed
            seq.feed.consume(len(seq.generated))
        seq.events.put_nowait(event)

    # ------------------------------------------------------------------ model steps (worker thread or inline)

    def _step(self, batch: list[Sequence], *, inline: bool = False) -> list[StepResult | BaseException]:
        results: dict[Sequence, StepResult | BaseException] = {}
        started = time.perf_counter()
        prefills = any(_needs_prefill(seq) for seq in batch)
        with self._model_lock, torch.inference_mode():
            decoding = [seq for seq in batch if seq.prefilled and seq.feed is None]
            for seq in batch:
                if seq.feed is not None:
                    results[seq] = self._guarded(seq, self._talk)
                elif not seq.prefilled:
                    measured = not encodes_media(seq.prompt)
                    prefill_started = time.perf_counter()
                    results[seq] = self._guarded(seq, self._prefill)
                    if measured:
                        elapsed = time.perf_counter() - prefill_started
                        self.prefill_cost.record(seq.prompt.num_tokens, elapsed, inline=inline)
                    if inline:
                        self.stats.inline_prefills += 1
            if self.decode_batching:
                results |= self._decode_batched(decoding)
            else:
                self._count_decode(1, forwards=len(decoding))
                for seq in decoding:
                    results[seq] = self._guarded(seq, self._decode)
        if not prefills:
            self._last_step_s = time.perf_counter() - started
        return [results[seq] for seq in batch]

    def _guarded(self, seq: Sequence, run: Callable[[Sequence], Forwarded]) -> StepResult | BaseException:
        """Get one sequence's logits and pick its token; a failure fails only this sequence."""
        try:
            logits, hidden = run(seq)
            return select_token(logits, seq.params, seq.generator), hidden
        except Exception as exc:
            logger.exception("generation failed for request %s", seq.request_id)
            return GenerationFailed(f"generation failed for request {seq.request_id}: {exc!r}")

    def _count_decode(self, rows_per_forward: int, forwards: int = 1) -> None:
        if rows_per_forward and forwards:
            self.stats.decode_forwards += forwards
            self.stats.max_decode_batch_observed = max(self.stats.max_decode_batch_observed, rows_per_forward)

    def _decode_batched(self, decoding: list[Sequence]) -> dict[Sequence, StepResult | BaseException]:
        """One forward decodes a token for every sequence in `decoding` (their caches joined as rows)."""
        results: dict[Sequence, StepResult | BaseException] = {}
        batched: list[Sequence] = []
        for seq in decoding:
            if seq in self._batch or (seq.cache is not None and batch_cache.supports(seq.cache)):
                batched.append(seq)
            elif seq.cache is not None:  # a cache kind the batch cannot pad (e.g. sliding windows)
                self._count_decode(1)
                results[seq] = self._guarded(seq, self._decode)
            else:
                results[seq] = GenerationFailed(f"request {seq.request_id} lost its KV cache")
        self._batch.retain(batched)
        if not batched:
            return results
        try:
            for seq in batched:
                if seq not in self._batch:
                    self._batch.add(seq, seq.cache)
                    seq.cache = None
            rows = [cast(Sequence, key) for key in self._batch.rows]
            logits, hidden = self._forward_rows(rows)
            self._batch.advanced()
        except Exception as exc:
            logger.exception("batched decode of %d sequences failed", len(batched))
            self._batch.clear()
            ids = ", ".join(seq.request_id for seq in batched)
            failure = GenerationFailed(f"generation failed for requests {ids}: {exc!r}")
            return results | dict.fromkeys(batched, failure)
        self._count_decode(len(rows))
        for row, seq in enumerate(rows):
            results[seq] = self._guarded(seq, functools.partial(_row_of, logits, hidden, row))
        return results

    def _forward_rows(self, rows: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batched decode forward: `[B, 1]` last tokens at each row's own position → `[B, vocab]`."""
        past = [seq.prompt.num_tokens + len(seq.generated) - 1 for seq in rows]
        if past != self._batch.lengths:
            raise RuntimeError(
                f"decode batch rows hold {self._batch.lengths} tokens, sequences expect {past}"
            )
        input_ids = torch.tensor([[seq.generated[-1]] for seq in rows], dtype=torch.long)
        text = torch.tensor(past, dtype=torch.long).view(1, -1, 1)
        if self.loaded.mrope:
            rope = text + torch.tensor([seq.prompt.rope_delta for seq in rows], dtype=torch.long).view(
                1, -1, 1
            )
            position_ids = torch.cat([text, rope, rope, rope], dim=0)
        else:
            position_ids = text[0]
        want_hidden = any(seq.hidden_sink is not None for seq in rows)
        result = self.loaded.model(
            **self._on_device(
                input_ids=input_ids,
                attention_mask=self._batch.attention_mask(),
                position_ids=position_ids,
                cache=self._batch.cache,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=want_hidden,
            )
        )
        logits: torch.Tensor = result.logits[:, -1].cpu()  # sampling runs on the CPU (its generators)
        return logits, _last_hidden(result, want_hidden)

    def _on_device(self, **kwargs: Any) -> dict[str, Any]:
        """The forward's arguments with every tensor on the model's device (a no-op on the CPU)."""
        device = self.loaded.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    def _prefill(self, seq: Sequence) -> Forwarded:
        loaded, prompt = self.loaded, seq.prompt
        seq.cache = DynamicCache(config=loaded.model.config.get_text_config())
        kwargs: dict[str, Any] = dict(prompt.model_inputs)
        if prompt.media_embeds is not None and prompt.media_positions is not None:
            device = loaded.device
            embeds = loaded.input_embeddings(prompt.input_ids.to(device)).clone()
            # Received embeddings may be on a GPU (CUDA through the sidecar) or the CPU: here, the model's.
            embeds[0, prompt.media_positions.to(device)] = prompt.media_embeds.to(device, embeds.dtype)
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = prompt.input_ids
        kwargs.update(
            attention_mask=torch.ones_like(prompt.input_ids),
            position_ids=prompt.position_ids,
            cache=seq.cache,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=seq.hidden_sink is not None,
        )
        result = loaded.model(**self._on_device(**kwargs))
        seq.prefilled = True
        # Media tensors are not needed after prefill.
        prompt.model_inputs = {}
        prompt.media_embeds = None
        logits: torch.Tensor = result.logits[0, -1].cpu()
        hidden = _last_hidden(result, seq.hidden_sink is not None)
        return logits, (hidden[0] if hidden is not None else None)

    def _decode(self, seq: Sequence) -> Forwarded:
        prompt = seq.prompt
        past = prompt.num_tokens + len(seq.generated) - 1
        input_ids = torch.tensor([[seq.generated[-1]]], dtype=torch.long)
        if self.loaded.mrope:
            rope = past + prompt.rope_delta
            position_ids = torch.tensor([[[past]], [[rope]], [[rope]], [[rope]]], dtype=torch.long)
        else:
            position_ids = torch.tensor([[past]], dtype=torch.long)
        result = self.loaded.model(
            **self._on_device(
                input_ids=input_ids,
                attention_mask=torch.ones((1, past + 1), dtype=torch.long),
                position_ids=position_ids,
                cache=seq.cache,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=seq.hidden_sink is not None,
            )
        )
        logits: torch.Tensor = result.logits[0, -1].cpu()
        hidden = _last_hidden(result, seq.hidden_sink is not None)
        return logits, (hidden[0] if hidden is not None else None)

    def _talk(self, seq: Sequence) -> Forwarded:
        """One talker step: input row `t` plus the embedding of token `t-1`, at position `t`."""
        feed = seq.feed
        assert feed is not None
        step = len(seq.generated)
        model = self.loaded.model
        if step == 0:
            seq.cache = DynamicCache(config=model.config.get_text_config())
        previous = None
        if seq.generated:
            token = torch.tensor([[seq.generated[-1]]], device=self.loaded.device)
            previous = self.loaded.input_embeddings(token)[0, 0]
        row = talker_step_input(feed.rows[step].to(self.loaded.device, self.loaded.dtype), previous)
        result = model(
            **self._on_device(
                inputs_embeds=row.view(1, 1, -1),
                attention_mask=torch.ones((1, step + 1), dtype=torch.long),
                position_ids=torch.tensor([[step]], dtype=torch.long),
                cache=seq.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        )
        seq.prefilled = True
        logits: torch.Tensor = result.logits[0, -1].cpu()
        return logits, None
