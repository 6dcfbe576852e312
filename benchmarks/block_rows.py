"""Where block products stop paying: dense (oneDNN) time / block time per row count.

For each of the default model's four layer products, all 30 layers are multiplied from
the GGUF blocks as the engine does (bfloat16 rows of 4-bit blocks through torch's int4
kernel, everything else through ours), through our kernel alone, and from the packed
dense weights, in turn, `--pairs` times. Printed: each path's median ms over the 30
layers, and the medians of the per-round ratios dense / engine and ours / engine (above
1: the engine's path is faster). `kernels.block_linear.MAX_ROWS` is set from this.

    .venv/bin/python benchmarks/block_rows.py --dtype bfloat16 --rows 1 2 4 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

import kernels.block_linear as block_linear
from engine.llm_engine import EngineConfig, LLMEngine
from engine.models.linear import linear

PRODUCTS = ("qkv", "o", "gate_up", "down")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ours_only(fn):
    """fn with torch's int4 product turned off: every block product on our kernel."""

    def run():
        block_linear.TORCH_INT4 = False
        try:
            fn()
        finally:
            block_linear.TORCH_INT4 = True

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    engine = LLMEngine.from_config(EngineConfig(dtype=args.dtype, prefix_cache_bytes=0))
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = engine.runner.model.layers
    dtype = getattr(torch, args.dtype)
    print(
        f"{args.dtype}, torch threads {torch.get_num_threads()}, torch int4 kernel "
        f"{'available' if block_linear.TORCH_INT4 else 'missing'}; ms over 30 layers "
        "(engine's block path / ours only / dense), then dense / engine and ours / engine\n"
    )
    print("| rows | product | engine ms | ours ms | dense ms | dense / engine | ours / engine |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for rows in args.rows:
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

                ours = _ours_only(from_blocks)
                paths = (from_blocks, ours, from_dense)
                for path in paths:
                    path()  # compile and warm
                times: list[tuple[float, ...]] = []
                for _ in range(args.pairs):
                    times.append(tuple(_seconds(path) for path in paths))
                engine_s, ours_s, dense_s = (
                    statistics.median(t) * 1e3 for t in zip(*times, strict=True)
                )
                dense_ratio = statistics.median(d / e for e, _, d in times)
                ours_ratio = statistics.median(o / e for e, o, _ in times)
                print(
                    f"| {rows} | {name} | {engine_s:.2f} | {ours_s:.2f} | {dense_s:.2f} | "
                    f"{dense_ratio:.2f} | {ours_ratio:.2f} |"
                )


if __name__ == "__main__":
    main()
