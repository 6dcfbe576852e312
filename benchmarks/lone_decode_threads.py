"""A lone sequence's decode on one thread vs on all, paired in one process.

For each context length the same prompt is decoded alternately with the engine's
`single_decode_threads` at 1 and at 0 (every torch thread), `--pairs` times; the figure
is the median of the per-pair ratios (all-threads time / one-thread time: above 1, one
thread is faster), with the range and both sides' ms a token.

    .venv/bin/python benchmarks/lone_decode_threads.py --dtype bfloat16 --pairs 6
"""

from __future__ import annotations

import engine as _server_threads  # noqa: F401  (the server's thread settings, before torch)

# isort: split
import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import ours_single, random_prompt  # noqa: E402

from engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine = LLMEngine.from_config(
        EngineConfig(dtype=args.dtype, max_num_batched_tokens=2048, prefix_cache_bytes=0)
    )
    vocab = engine.model_config.vocab_size
    ours_single(engine, random_prompt(64, vocab, 0), 8)  # warm-up
    print(f"torch threads: {torch.get_num_threads()}")
    print("| context | one thread, ms/tok | all, ms/tok | all / one (median) | range |")
    print("|---:|---|---|---:|---|")
    with torch.inference_mode():
        for ctx in args.contexts:
            prompt = random_prompt(ctx, vocab, ctx)
            one, every = [], []
            for _ in range(args.pairs):
                for threads, times in ((1, one), (0, every)):
                    engine.runner.single_decode_threads = threads
                    times.append(ours_single(engine, prompt, args.decode_tokens)[1] * 1e3)
            ratios = sorted(a / b for a, b in zip(every, one, strict=True))
            print(
                f"| {ctx} | {' '.join(f'{t:.0f}' for t in one)} | "
                f"{' '.join(f'{t:.0f}' for t in every)} | {statistics.median(ratios):.2f}x | "
                f"{ratios[0]:.2f}-{ratios[-1]:.2f}x |"
            )


if __name__ == "__main__":
    main()
