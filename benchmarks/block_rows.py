"""Where block products stop paying: dense (oneDNN) time / block time per row count.

For each of the default model's four layer products, all 30 layers are multiplied from
the GGUF blocks and then from the packed dense weights, alternately, `--pairs` times;
the printed figure is the median of the per-pair ratios (above 1: the blocks are
faster). `kernels.block_linear.MAX_ROWS` is set from this.

    .venv/bin/python benchmarks/block_rows.py --dtype bfloat16 --rows 1 2 3 4
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.models.linear import linear

PRODUCTS = ("qkv", "o", "gate_up", "down")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--pairs", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine = LLMEngine.from_config(EngineConfig(dtype=args.dtype, prefix_cache_bytes=0))
    layers = engine.runner.model.layers
    dtype = getattr(torch, args.dtype)
    print(f"| rows | {' | '.join(PRODUCTS)} |\n|---:|{'---:|' * len(PRODUCTS)}")
    with torch.inference_mode():
        for rows in args.rows:
            cells = []
            for name in PRODUCTS:
                blocks = [getattr(layer, f"{name}_blocks") for layer in layers]
                dense = [getattr(layer, f"{name}_weight") for layer in layers]
                x = torch.randn(rows, blocks[0].in_features).to(dtype)

                def from_blocks(x=x, blocks=blocks):
                    for b in blocks:
                        b.matmul(x)

                def from_dense(x=x, dense=dense):
                    for w in dense:
                        linear(x, w, None, None)

                from_blocks(), from_dense()  # compile and warm
                ratios = [_seconds(from_dense) / _seconds(from_blocks) for _ in range(args.pairs)]
                cells.append(f"{statistics.median(ratios):.2f}")
            print(f"| {rows} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
