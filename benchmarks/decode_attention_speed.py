"""Batched decode attention alone: kernels.decode_attention vs torch's attention per sequence.

One decode step of attention for a batch of sequences over all layers of a model shaped
like the default one (9 query heads, 3 KV heads of 64 dims, 30 layers), each layer with
its own KV buffers so the step reads them from memory as the engine does. The baseline
is what the engine would otherwise run: torch's scaled_dot_product_attention per
sequence. The two alternate, and the speed-up is the median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server sets it, before torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels.decode_attention import decode_attention  # noqa: E402

HQ, HKV, D = 9, 3, 64


class Step:
    """KV buffers [Hkv, capacity, D] per (layer, sequence), and one step's inputs."""

    def __init__(self, batch: int, context: int, layers: int, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        cap = context + 64

        def buffer() -> torch.Tensor:
            return torch.randn(HKV, cap, D, generator=gen).to(dtype)

        self.k = [[buffer() for _ in range(batch)] for _ in range(layers)]
        self.v = [[buffer() for _ in range(batch)] for _ in range(layers)]
        self.context = context
        self.q = torch.randn(batch, HQ, D, generator=gen).to(dtype)
        self.k_new = torch.randn(batch, HKV, D, generator=gen).to(dtype)
        self.v_new = torch.randn(batch, HKV, D, generator=gen).to(dtype)
        self.seg_start = np.arange(batch + 1, dtype=np.int64)
        self.seg_stride = np.full(batch, cap * D, dtype=np.int64)
        self.seg_len = np.full(batch, context, dtype=np.int64)

    def kernel(self) -> torch.Tensor:
        for k, v in zip(self.k, self.v, strict=True):
            out, _ = decode_attention(
                self.q,
                self.k_new,
                self.v_new,
                self.seg_start,
                np.array([t.data_ptr() for t in k], dtype=np.int64),
                np.array([t.data_ptr() for t in v], dtype=np.int64),
                self.seg_stride,
                self.seg_len,
                D**-0.5,
                append=False,
            )
        return out

    def per_sequence(self) -> torch.Tensor:
        n = self.context
        for k, v in zip(self.k, self.v, strict=True):
            out = torch.empty(self.q.shape, dtype=torch.float32)
            for b, (kb, vb) in enumerate(zip(k, v, strict=True)):
                o = F.scaled_dot_product_attention(
                    self.q[b].view(1, HQ, 1, D),
                    kb[:, :n].unsqueeze(0),
                    vb[:, :n].unsqueeze(0),
                    scale=D**-0.5,
                    enable_gqa=True,
                )
                out[b] = o.view(HQ, D)
        return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for dtype in args.dtypes:
        for context in args.contexts:
            step = Step(args.batch, context, args.layers, getattr(torch, dtype))
            last_layer = step.kernel().sub(step.per_sequence()).abs().max().item()
            ours, theirs = [], []
            for _ in tqdm(range(args.repeats), desc=f"{dtype} {context}"):
                ours.append(timed(step.kernel))
                theirs.append(timed(step.per_sequence))
            speedup = statistics.median(t / o for o, t in zip(ours, theirs, strict=True))
            kv_mb = 2 * args.layers * args.batch * HKV * context * D * step.q.element_size() / 1e6
            rows.append(
                (dtype, context, kv_mb, statistics.median(ours), statistics.median(theirs),
                 speedup, last_layer)
            )  # fmt: skip
            del step
    print(
        f"\n{args.batch} sequences, {args.layers} layers, torch threads "
        f"{torch.get_num_threads()}; ms per step of attention, median of {args.repeats}"
    )
    print("\n| KV dtype | context | KV read, MB | kernel ms | SDPA per sequence ms | speed-up "
          "(median of pairs) | max abs diff |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype, context, kv_mb, ours, theirs, speedup, diff in rows:
        print(
            f"| {dtype} | {context} | {kv_mb:.0f} | {ours:.1f} | {theirs:.1f} | {speedup:.2f}x "
            f"| {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
