"""Benchmark: the LLM executor's engine with batched decode steps vs one forward per sequence.

N concurrent text requests of T tokens each (EOS disabled, so every request runs its full length)
go through `cornserve.llm_executor.engine.Engine` in-process on one checkpoint, with
`decode_batching` on and off, in the same run; a sequential pass (one request at a time) is the
baseline. Reports the best wall time over R rounds, the model forwards per round, and whether
every request's tokens were identical across the three ways.

    uv run python bench/llm_batching.py                  # tiny random Qwen2-VL, 4 x 32 tokens
    uv run python bench/llm_batching.py --model DIR --concurrency 8 --tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from cornserve.llm_executor.engine import Engine
from cornserve.llm_executor.model import LoadedModel, load_model
from cornserve.llm_executor.prompt import PreparedPrompt, prepare_with_media
from cornserve.llm_executor.sampling import SamplingParams
from cornserve.task.builtins.chat import ChatCompletionRequest

PROMPTS = ["Tell me a story.", "Hi", "What is the weather like today in the city?", "Colors?"]


def prompts(loaded: LoadedModel, n: int) -> list[PreparedPrompt]:
    """Fresh prepared prompts (the engine consumes their media state)."""
    return [
        prepare_with_media(
            loaded,
            ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            ),
            [],
        )
        for i in range(n)
    ]


async def generate(engine: Engine, name: str, prompt: PreparedPrompt, tokens: int) -> list[int | None]:
    seq = engine.submit(name, prompt, SamplingParams(), tokens)
    return [event.token_id async for event in engine.tokens(seq, 300)]


async def measure(
    loaded: LoadedModel, decode_batching: bool, concurrent: bool, n: int, tokens: int, rounds: int
) -> tuple[float, int, list[list[int | None]]]:
    """Best wall time over `rounds`, model forwards per round, the tokens of the last round."""
    engine = Engine(loaded, max_batch_size=n, decode_batching=decode_batching)
    engine.start()
    best, forwards, outputs = float("inf"), 0, []
    try:
        for _ in range(rounds):
            before = engine.stats.decode_forwards + engine.stats.sequences_started
            batch = prompts(loaded, n)
            start = time.perf_counter()
            if concurrent:
                outputs = await asyncio.gather(
                    *(generate(engine, f"r{i}", p, tokens) for i, p in enumerate(batch))
                )
            else:
                outputs = [await generate(engine, f"r{i}", p, tokens) for i, p in enumerate(batch)]
            best = min(best, time.perf_counter() - start)
            forwards = engine.stats.decode_forwards + engine.stats.sequences_started - before
    finally:
        await engine.close()
    return best, forwards, list(outputs)


async def main_async(args: argparse.Namespace) -> None:
    model = args.model
    if model is None:
        from cornserve.models.tiny import build_tiny

        model = str(
            build_tiny("qwen2-vl", Path(tempfile.mkdtemp(prefix="cornserve-bench-llm-")) / "tiny", seed=0)
        )
    loaded = load_model(model)
    loaded.eos_token_ids = frozenset()  # every request generates exactly --tokens tokens
    n, t, r = args.concurrency, args.tokens, args.rounds
    rows = []
    reference = None
    for label, batching, concurrent in (
        ("sequential (one request at a time)", True, False),
        ("concurrent, one forward per sequence", False, True),
        ("concurrent, batched decode (default)", True, True),
    ):
        wall, forwards, outputs = await measure(loaded, batching, concurrent, n, t, r)
        reference = reference or outputs
        rows.append((label, wall, forwards, outputs == reference))
    print(f"\nmodel {model}; {n} requests x {t} tokens; best of {r} rounds; CPU")
    print("| engine | wall ms | tokens/s | forwards (prefill + decode) | same tokens as sequential |")
    print("|---|---:|---:|---:|---|")
    for label, wall, forwards, same in rows:
        print(f"| {label} | {wall * 1e3:.0f} | {n * t / wall:.0f} | {forwards} | {'yes' if same else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="checkpoint dir (default: a tiny random Qwen2-VL)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
