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

Ours run in the server's thread settings: passive OpenMP workers (engine/__init__.py),
and a lone sequence's decode step on the engine's `--single-decode-threads` default (one
thread for this model);
transformers and llama.cpp run in a child process (`--peer-worker`) under libgomp's
default (spin, then sleep), each side under its own default as in decode_speed.py.

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
import os
import sys
import time
from pathlib import Path

# As the server does (engine/__init__.py), before torch loads OpenMP; not in the peer
# worker, which runs under libgomp's default.
USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
if "--peer-worker" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engine.model_files import default_gguf_path, default_model_dir  # noqa: E402
from engine.model_loader import load_model  # noqa: E402
from engine.model_runner import auto_single_decode_threads, torch_threads  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from child_worker import ChildWorker  # noqa: E402
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
    # a lone sequence's decode step on the threads the engine gives it (one for this
    # model, `--single-decode-threads`); a batch on all of them
    lone = auto_single_decode_threads(model.config, model.norm.dtype, torch.device("cpu"))
    with torch_threads(lone if len(caches) == 1 else 0):
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


class PeerProcess(ChildWorker):
    """transformers and llama.cpp in a child process under libgomp's default wait policy,
    timed on request."""

    def __init__(self, dtype: str, threads: int) -> None:
        cmd = [sys.executable, __file__, "--peer-worker", dtype, str(threads)]
        super().__init__(cmd, USER_WAIT_POLICY)

    def single(self, system: str, context: int, steps: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds per token) of `system` on random_prompt(context)."""
        prefill, decode = self.ask(f"{system} {context} {steps}")
        return prefill, decode


def peer_worker(dtype: str, threads: int) -> None:
    """Answer `system context steps` lines on stdin with JSON timings on stdout."""
    torch.set_num_threads(threads)
    hf = None
    with torch.inference_mode():
        for line in sys.stdin:
            system, context, steps = line.split()
            context, steps = int(context), int(steps)
            if system == "transformers":
                if hf is None:
                    from transformers import AutoModelForCausalLM

                    hf = AutoModelForCausalLM.from_pretrained(
                        default_model_dir(), dtype=getattr(torch, dtype)
                    ).eval()
                prompt = random_prompt(context, hf.config.vocab_size, context)
                timings = hf_single(hf, prompt, steps)
            else:
                vocab = json.loads((default_model_dir() / "config.json").read_text())
                prompt = random_prompt(context, vocab["vocab_size"], context)
                timings = llama_cpp_b1(prompt, steps, threads)
            print(json.dumps(timings), flush=True)


def main() -> None:
    if "--peer-worker" in sys.argv:
        at = sys.argv.index("--peer-worker")
        peer_worker(sys.argv[at + 1], int(sys.argv[at + 2]))
        return
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

    # As the engine loads it: packed weights, and in float32 the GGUF's blocks for decode.
    model = load_model(None, dtype, block_weights=True).model
    model.pack_weights()
    vocab = model.config.vocab_size
    peers: dict[str, str] = {}
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
    systems = [s for s in ("transformers", "llama.cpp") if s not in args.skip and s not in peers]
    worker = PeerProcess(args.dtype, torch.get_num_threads()) if systems else None
    for ctx in tqdm(peer_contexts if worker else [], desc="peers, batch 1"):
        for system in systems:
            prefill, decode = worker.single(system, ctx, args.steps)
            rows.append(dict(system=system, context=ctx, batch=1,
                             prefill_tok_s=ctx / prefill, decode_ms=decode * 1e3))  # fmt: skip
    if worker:
        worker.close()
        peers["OpenMP wait policy"] = (
            f"ours {os.environ.get('OMP_WAIT_POLICY')}, peers {worker.wait_policy}"
        )
    lone = auto_single_decode_threads(model.config, dtype, torch.device("cpu")) or "all"
    peers["threads"] = (
        f"ours: prefill and batches on {torch.get_num_threads()}, a lone sequence's decode "
        f"on {lone}; peers on {torch.get_num_threads()}"
    )

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
