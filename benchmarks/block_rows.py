"""Where block products stop paying: dense (oneDNN) time / block time per row count.

For each of the default model's four layer products, all 30 layers are multiplied from
the GGUF blocks as the engine does (bfloat16 rows of 4-bit blocks through AMX tiles from
AMX_MIN_ROWS rows where the CPU has them, else torch's int4 kernel; everything else
through ours), with AMX off (torch's int4 kernel for bf16), through our kernel alone,
and from the packed dense weights, in turn, `--pairs` times. Printed: each path's median
ms over the 30 layers, and the medians of the per-round ratios of each path's time to
the engine's (above 1: the engine's path is faster). The row limits in
`kernels.block_linear` are set from this.

    .venv/bin/python benchmarks/block_rows.py --dtype bfloat16 --rows 1 2 4 --threads 1
"""

from __future__ import annotations

import engine as _server_threads  # noqa: F401  (the server's thread settings, before torch)

# isort: split
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


def _without(fn, *switches: str):
    """fn with these module switches of kernels.block_linear (TORCH_INT4, AMX) off."""
    before = {name: getattr(block_linear, name) for name in switches}

    def run():
        for name in switches:
            setattr(block_linear, name, False)
        try:
            fn()
        finally:
            for name, value in before.items():
                setattr(block_linear, name, value)

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
        f"{'available' if block_linear.TORCH_INT4 else 'missing'}, AMX "
        f"{'available' if block_linear.AMX else 'missing'}; ms over 30 layers "
        "(engine's block path / AMX off / ours only / dense), then each / engine\n"
    )
    print(
        "| rows | product | engine ms | AMX off ms | ours ms | dense ms "
        "| AMX off / engine | ours / engine | dense / engine |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
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

                no_amx = _without(from_blocks, "AMX")
                ours = _without(from_blocks, "AMX", "TORCH_INT4")
                paths = (from_blocks, no_amx, ours, from_dense)
                for path in paths:
                    path()  # compile and warm
                times: list[tuple[float, ...]] = []
                for _ in range(args.pairs):
                    times.append(tuple(_seconds(path) for path in paths))
                ms = [statistics.median(t) * 1e3 for t in zip(*times, strict=True)]
                ratios = [statistics.median(t[i] / t[0] for t in times) for i in (1, 2, 3)]
                print(f"| {rows} | {name} | " + " | ".join(f"{v:.2f}" for v in ms + ratios) + " |")


if __name__ == "__main__":
    main()
