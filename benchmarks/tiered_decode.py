"""Decode latency and device-tier bytes vs context: full vs retrieval vs streaming.

For each context length and attention mode, one prompt is prefilled through the default
model, its cache is forked to form a batch of 8, and decode steps are timed at batch 1
and batch 8. All numbers come from one run on this machine. Usage:

    .venv/bin/python benchmarks/tiered_decode.py [--contexts 2048 4096 8000] [--index exact]
"""

from __future__ import annotations

import engine  # noqa: F401  (the server's thread settings, before torch loads)

# isort: split
import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.attention_backend import AttentionBackend
from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.index_retriever import retriever_factory
from engine.model_loader import load_model
from engine.tiered_attention import TieredAttentionBackend

MODES = ("full", "retrieval", "streaming")
HERE = Path(__file__).parent


def make_backend(mode: str, model, top_k: int, index: str = "exact") -> AttentionBackend:
    shape = model.cache_shape()
    if mode == "full":
        return FullAttentionBackend(shape)
    factory = retriever_factory(index) if mode == "retrieval" else None
    return TieredAttentionBackend(shape, mode=mode, top_k=top_k, retriever_factory=factory)


def forward(model, backend, caches, token_ids: list[list[int]]) -> torch.Tensor:
    slices, ids, pos, start = [], [], [], 0
    for cache, toks in zip(caches, token_ids, strict=True):
        n0 = backend.cache_len(cache)
        slices.append(SequenceSlice(cache, start, len(toks), n0))
        ids.extend(toks)
        pos.extend(range(n0, n0 + len(toks)))
        start += len(toks)
    ctx = ForwardContext(slices, backend)
    hidden = model(torch.tensor(ids), torch.tensor(pos), ctx)
    return model.compute_logits(hidden[ctx.last_token_indices()])


def time_decode(model, backend, caches, steps: int) -> float:
    """Median seconds per decode step for the batch `caches`."""
    tokens = [[7] for _ in caches]
    forward(model, backend, caches, tokens)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = forward(model, backend, caches, tokens)
        times.append(time.perf_counter() - t0)
        tokens = [[int(t)] for t in logits.argmax(-1)]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--index", default="exact", help="host-tier index for retrieval mode")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tiered_decode")
    args = parser.parse_args()

    # As the engine loads it: packed weights and the GGUF's blocks for decode.
    model = load_model(None, block_weights=True).model
    model.pack_weights()
    vocab = model.config.vocab_size

    rows = []
    jobs = [(c, m) for c in args.contexts for m in MODES]
    with torch.inference_mode():
        for ctx_len, mode in tqdm(jobs, desc="context x mode"):
            gen = torch.Generator().manual_seed(ctx_len)
            prompt = torch.randint(3, vocab, (ctx_len,), generator=gen).tolist()
            backend = make_backend(mode, model, args.top_k, args.index)
            cache = backend.new_cache()
            t0 = time.perf_counter()
            for i in range(0, ctx_len, args.chunk):
                forward(model, backend, [cache], [prompt[i : i + args.chunk]])
            prefill_s = time.perf_counter() - t0
            stats = backend.memory_stats()
            single = time_decode(model, backend, [cache], args.steps)
            batch = [cache] + [backend.fork(cache) for _ in range(args.batch - 1)]
            batched = time_decode(model, backend, batch, args.steps)
            rows.append(
                {
                    "context": ctx_len,
                    "mode": mode,
                    "prefill_s": prefill_s,
                    "device_bytes": stats["device_bytes"],
                    "host_bytes": stats["host_bytes"],
                    "b1_ms": single * 1e3,
                    "b8_step_ms": batched * 1e3,
                }
            )
            for c in batch:
                backend.free(c)

    report = render(rows, args)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(report)
    plot(rows, args.out.with_suffix(".png"), args.batch)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


def render(rows: list[dict], args: argparse.Namespace) -> str:
    full = {r["context"]: r for r in rows if r["mode"] == "full"}
    lines = [
        f"torch threads {torch.get_num_threads()}, fp32, index {args.index}, top_k {args.top_k}, "
        f"sinks 128, window 512, batch {args.batch} built by forking one prefilled cache; "
        "retrieval decode time includes the one-off index build at the first step: excluded "
        "here, the warm-up step builds it",
        "",
        f"| context | mode | device KiB/seq | host KiB/seq | prefill s | decode ms/tok b1 "
        f"| vs full b1 | step ms b{args.batch} | ms/tok b{args.batch} | vs full b{args.batch} |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = full[r["context"]]
        lines.append(
            f"| {r['context']} | {r['mode']} | {r['device_bytes'] / 1024:.0f} "
            f"| {r['host_bytes'] / 1024:.0f} | {r['prefill_s']:.1f} | {r['b1_ms']:.1f} "
            f"| {r['b1_ms'] / f['b1_ms']:.2f}x | {r['b8_step_ms']:.1f} "
            f"| {r['b8_step_ms'] / args.batch:.1f} | {r['b8_step_ms'] / f['b8_step_ms']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "b1_ms", "batch 1: ms per token"),
        (axes[1], "b8_step_ms", f"batch {batch}: ms per step"),
    ):
        for mode in MODES:
            pts = [(r["context"], r[key]) for r in rows if r["mode"] == mode]
            ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
