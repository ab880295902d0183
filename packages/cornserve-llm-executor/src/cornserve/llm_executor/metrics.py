"""The LLM executor's Prometheus metrics (`GET /metrics`): its engine's sequences and tokens.

Time to first token counts from the moment a sequence joins the engine's queue (queueing included);
time per output token is the time between two tokens of one sequence. Engine counters are read from
`EngineStats` at scrape time (the same figures `/stats` shows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cornserve.runtime.metrics import LATENCY_BUCKETS_S, STEP_BUCKETS_S, read_on_loop

TTFT = Histogram(
    "cornserve_llm_time_to_first_token_seconds",
    "Time from a sequence's arrival at the engine to its first generated token.",
    buckets=LATENCY_BUCKETS_S,
)
TPOT = Histogram(
    "cornserve_llm_time_per_output_token_seconds",
    "Time between two generated tokens of one sequence.",
    buckets=STEP_BUCKETS_S,
)


class EngineCollector(Collector):
    """The engine's counters and queue lengths, read now."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        """The families, read now (none before the engine exists)."""
        if self.source is None:
            return []
        stats = self.source()
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        for name, doc, key in (
            ("cornserve_llm_sequences_running", "Sequences being generated now.", "active"),
            ("cornserve_llm_sequences_waiting", "Sequences waiting for a batch slot.", "waiting"),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], stats[key])
            families.append(gauge)
        for name, doc, key in (
            ("cornserve_llm_sequences_started", "Sequences admitted to the engine.", "sequences_started"),
            ("cornserve_llm_sequences_finished", "Sequences that ended (done, failed or cancelled).", "sequences_finished"),
            ("cornserve_llm_sequences_cancelled", "Sequences dropped unfinished (caller gone, stop string).", "sequences_cancelled"),
            ("cornserve_llm_generated_tokens", "Tokens generated.", "tokens_generated"),
            ("cornserve_llm_engine_steps", "Engine steps (one batched prefill/decode round each).", "steps"),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], stats[key])
            families.append(counter)
        return families


ENGINE = EngineCollector()
REGISTRY.register(ENGINE)


def watch_engine(stats: Callable[[], dict[str, int]]) -> None:
    """Report what `stats` says (the engine's `EngineStats` as a dict)."""
    ENGINE.source = read_on_loop(stats)
