"""Long-context speed: our full / retrieval / streaming modes vs transformers and llama.cpp.

For each context length (random tokens; beyond the model's trained length this measures
speed, not accuracy) and batch size, every system prefills one prompt and decodes. Ours
run through the engine's model and attention backends with packed weights, as the
server does; transformers runs `generate` on the same weights and dtype; llama.cpp runs
the default model's GGUF through `llama-cpp-python` (a benchmark-only install, see
benchmarks/README.md; without it its column says why). Batch > 1 for ours: full and
streaming fork the prefilled cache (independent copies); retrieval makes snapshot
children of it, which share the built host-tier index (a fork would rebuild it per copy)
while each child has its own device tier. transformers and llama.cpp run batch 1 only.

Prints a table (prefill tokens/s, decode ms/token, device- and host-tier bytes, index
build seconds) and each system's decode ratio against every peer measured in the same
run, and writes a PNG of decode latency vs context. Usage:

    .venv/bin/python benchmarks/longctx_speed.py [--contexts 2048 4096 8192 16384 32768]
        [--batches 1 8] [--index attention-aware] [--dtype bfloat16] [--steps 16]
        [--peer-max-context 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.model_files import default_gguf_path, default_model_dir
from engine.model_loader import load_model

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import hf_single  # noqa: E402
from tiered_decode import forward, make_backend, time_decode  # noqa: E402

HERE = Path(__file__).parent
MODES = ("full", "retrieval", "streaming")


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def ours(model, mode: str, index: str, prompt: list[int], batch: int, steps: int, chunk: int):
    """Prefill seconds, median decode seconds per step, one sequence's tier bytes after its
    prefill, index build seconds."""
    backend = make_backend(mode, model, 100, index)
    cache = backend.new_cache()
    start = time.perf_counter()
    for i in range(0, len(prompt), chunk):
        forward(model, backend, [cache], [prompt[i : i + chunk]])
    prefill = time.perf_counter() - start
    build = None
    if mode == "retrieval":
        forward(model, backend, [cache], [[7]])  # the first decode step builds the index
        build = getattr(cache.retriever, "build_seconds", 0.0)  # exact: nothing to build
    stats = backend.memory_stats()  # one sequence's tiers, before the batch is formed
    caches = [cache]
    if batch > 1 and mode == "retrieval":
        snapshot = backend.freeze(cache)
        caches += [backend.child(snapshot) for _ in range(batch - 1)]
    elif batch > 1:
        caches += [backend.fork(cache) for _ in range(batch - 1)]
    step = time_decode(model, backend, caches, steps)
    for c in caches:
        backend.free(c)
    return prefill, step, stats, build


def llama_cpp_b1(prompt: list[int], steps: int, threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(default_gguf_path()),
        n_ctx=len(prompt) + steps + 8,
        n_batch=512,
        n_threads=threads,
        verbose=False,
    )
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        llm.eval([7])  # the token's value does not change the cost
    decode = (time.perf_counter() - start) / steps
    del llm
    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--index", default="attention-aware")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--skip", nargs="*", default=[], help="systems to leave out")
    parser.add_argument(
        "--peer-max-context",
        type=int,
        default=8192,
        help="longest context transformers and llama.cpp run (transformers' eager "
        "attention holds a context x context score matrix per head: 18 GiB a layer at 32K)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "longctx_speed")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    model_dir = default_model_dir()
    # As the engine loads it: packed weights, and in float32 the GGUF's blocks for decode.
    model = load_model(None, dtype, block_weights=True).model
    model.pack_weights()
    vocab = model.config.vocab_size
    peers: dict[str, str] = {}
    hf = None
    if "transformers" not in args.skip:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if "llama.cpp" not in args.skip:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            peers["llama.cpp"] = f"not measured: {exc}"

    rows = []
    jobs = [(c, b, m) for c in args.contexts for b in args.batches for m in MODES]
    jobs = [j for j in jobs if j[2] not in args.skip]
    with torch.inference_mode():
        for ctx, batch, mode in tqdm(jobs, desc="context x batch x mode"):
            prompt = random_prompt(ctx, vocab, ctx)
            prefill, step, stats, build = ours(
                model, mode, args.index, prompt, batch, args.steps, args.chunk
            )
            rows.append(
                dict(system=mode, context=ctx, batch=batch, prefill_tok_s=ctx / prefill,
                     decode_ms=step * 1e3 / batch, step_ms=step * 1e3,
                     device_bytes=stats.get("device_bytes", 0),
                     host_bytes=stats.get("host_bytes", 0), build_s=build)
            )  # fmt: skip
        peer_contexts = [c for c in args.contexts if c <= args.peer_max_context]
        for ctx in tqdm(peer_contexts, desc="peers, batch 1"):
            prompt = random_prompt(ctx, vocab, ctx)
            if hf is not None:
                prefill, decode = hf_single(hf, prompt, args.steps)
                rows.append(dict(system="transformers", context=ctx, batch=1,
                                 prefill_tok_s=ctx / prefill, decode_ms=decode * 1e3))  # fmt: skip
            if "llama.cpp" not in args.skip and "llama.cpp" not in peers:
                prefill, decode = llama_cpp_b1(prompt, args.steps, torch.get_num_threads())
                rows.append(dict(system="llama.cpp", context=ctx, batch=1,
                                 prefill_tok_s=ctx / prefill, decode_ms=decode * 1e3))  # fmt: skip

    report = render(rows, args, peers)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')}, .json and .png")


def render(rows: list[dict], args: argparse.Namespace, peers: dict[str, str]) -> str:
    lines = [
        f"{args.dtype}, torch threads {torch.get_num_threads()}, index {args.index}, top_k 100, "
        f"128 sinks + 512 window, median of {args.steps} decode steps, random tokens",
        "",
        "| system | context | batch | prefill tok/s | decode ms/tok | device KiB/seq "
        "| host KiB/seq | index build s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        build = r.get("build_s")
        lines.append(
            f"| {r['system']} | {r['context']} | {r['batch']} | {r['prefill_tok_s']:.0f} "
            f"| {r['decode_ms']:.1f} | {r.get('device_bytes', 0) / 1024:.0f} "
            f"| {r.get('host_bytes', 0) / 1024:.0f} | {'' if build is None else f'{build:.1f}'} |"
        )
    b1 = {(r["system"], r["context"]): r for r in rows if r["batch"] == 1}
    others = [s for s in ("transformers", "llama.cpp") if any(k[0] == s for k in b1)]
    if others:
        lines += ["", "Decode ratios, batch 1 (ours / peer ms per token; < 1 is faster):", ""]
        lines += _ratio_table(b1, others)
    contexts = sorted({r["context"] for r in rows})
    retrieval = {r["context"]: r["decode_ms"] for r in rows if r["system"] == "retrieval"
                 and r["batch"] == 1}  # fmt: skip
    last = contexts[-1]
    if last in retrieval:  # the goal is from 2K; every shorter base is shown too
        for base in (c for c in contexts[:-1] if c in retrieval):
            growth = retrieval[last] / retrieval[base]
            lines += ["", f"retrieval decode growth {base} -> {last}: {growth:.2f}x"]
    for system, why in peers.items():
        lines += ["", f"{system}: {why}"]
    return "\n".join(lines) + "\n"


def _ratio_table(b1: dict, others: list[str]) -> list[str]:
    """Each of our modes' batch-1 decode against each peer, by context."""
    lines: list[str] = []
    lines.append("| system | context | " + " | ".join(f"vs {p}" for p in others) + " |")
    lines.append("|---|---:|" + "---:|" * len(others))
    for (system, ctx), r in sorted(b1.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if system not in MODES:
            continue
        cells = []
        for p in others:
            peer = b1.get((p, ctx))
            cells.append(f"{r['decode_ms'] / peer['decode_ms']:.2f}x" if peer else "-")
        lines.append(f"| {system} | {ctx} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for system in sorted({(r["system"], r["batch"]) for r in rows}):
        pts = sorted((r["context"], r["decode_ms"]) for r in rows
                     if (r["system"], r["batch"]) == system)  # fmt: skip
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{system[0]} b{system[1]}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode ms per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
