"""Recall of every key-index kind on real attention: decode queries vs prefill keys.

Runs the default model (SmolLM2-135M) over a long prompt of real text (the package
descriptions shipped in the installed wheels' METADATA), records the post-RoPE queries
and cached keys of a few layers, and for a few (layer, query head) pairs:

- indexes the keys a late decode step would find in the host tier (positions
  [sinks, T - n_test - window)),
- builds each index kind (the attention-aware one from the prefill queries),
- searches with the queries of the last `n_test` positions (the "decode" queries),

and prints recall@k of the exact top-k attention keys against the fraction of keys
scanned, sweeping each kind's effort knob, with build time and per-query latency.
Writes the table (md) and the recall-vs-scanned curve (png) next to this script.

    .venv/bin/python benchmarks/index_recall.py            # ~8K tokens, 3 layers x 2 heads
    .venv/bin/python benchmarks/index_recall.py --tokens 4000 --layers 5 --heads 0
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

from engine.forward_context import ForwardContext, SequenceSlice  # noqa: E402
from engine.full_attention import FullAttentionBackend  # noqa: E402
from engine.model_config import ModelConfig  # noqa: E402
from engine.model_files import default_model_dir  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402
from engine.weights import load_safetensors_dir  # noqa: E402
from retrieval import create_index, exact_topk, index_class  # noqa: E402

# kind -> (effort knob, values swept, constructor options)
SWEEPS: dict[str, tuple[str | None, list[int], dict]] = {
    "exact": (None, [0], {}),
    "faiss-flat": (None, [0], {}),
    "faiss-ivf": ("nprobe", [1, 2, 4, 8, 16, 32, 64], {}),
    "faiss-hnsw": ("ef", [100, 200, 400, 800, 1600], {"M": 32, "ef_construction": 100}),
    "hnswlib": ("ef", [100, 200, 400, 800, 1600], {"M": 16, "ef_construction": 100}),
    "attention-aware": ("scan_factor", [2, 3, 4, 6, 8, 12, 16, 24], {}),
}


def default_effort(kind: str) -> int | None:
    """The effort the server uses for `kind` (its constructor's default knob value)."""
    knob = SWEEPS[kind][0]
    if knob is None:
        return None
    param = inspect.signature(index_class(kind).__init__).parameters.get(knob)
    return None if param is None else param.default


class CaptureBackend(FullAttentionBackend):
    """Full attention that also records the (post-RoPE) queries of chosen layers."""

    def __init__(self, shape, layers: list[int]) -> None:
        super().__init__(shape)
        self.queries: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def forward(self, layer, q, k, v, ctx, scale):
        if layer in self.queries:
            self.queries[layer].append(q.detach().clone())
        return super().forward(layer, q, k, v, ctx, scale)


def real_text_tokens(tokenizer, num_tokens: int) -> list[int]:
    """Token ids of the installed packages' long descriptions, concatenated."""
    dists = sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"].lower())
    ids: list[int] = []
    for dist in dists:
        meta = dist.read_text("METADATA") or ""
        body = meta.split("\n\n", 1)[1] if "\n\n" in meta else ""
        if len(body) < 500:
            continue
        ids += tokenizer.encode(body + "\n\n", add_special_tokens=False)
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise SystemExit(f"only {len(ids)} tokens of package text found; lower --tokens")


@torch.inference_mode()
def capture(num_tokens: int, layers: list[int], chunk: int = 1024):
    """Run the default model over real text.

    Returns (config, {layer: (q [T, Hq, D], k [Hkv, T, D])}).
    """
    model_dir = default_model_dir()
    config = ModelConfig.from_dir(model_dir)
    if num_tokens > config.max_position_embeddings:
        raise SystemExit(f"--tokens must be <= {config.max_position_embeddings}")
    bad = [layer for layer in layers if not 0 <= layer < config.num_layers]
    if bad:
        raise SystemExit(f"--layers {bad} out of range [0, {config.num_layers})")
    model = build_model(config)
    model.load_hf_state_dict(load_safetensors_dir(model_dir))
    tokens = real_text_tokens(load_tokenizer(model_dir), num_tokens)
    backend = CaptureBackend(model.cache_shape(), layers)
    cache = backend.new_cache()
    for start in range(0, num_tokens, chunk):
        ids = torch.tensor(tokens[start : start + chunk])
        ctx = ForwardContext(slices=[SequenceSlice(cache, 0, len(ids), start)], backend=backend)
        model(ids, torch.arange(start, start + len(ids)), ctx)
    out = {}
    for layer in layers:
        q = torch.cat(backend.queries[layer]).float().numpy()
        k = cache.k[layer][:, :num_tokens].float().numpy()
        out[layer] = (q, k)
    return config, out


def cached_capture(num_tokens: int, layers: list[int], path: Path | None):
    """`capture`, reusing the arrays saved at `path` by an earlier run with the same args."""
    if path is None:
        return capture(num_tokens, layers)
    config = ModelConfig.from_dir(default_model_dir())
    if path.exists():
        data = np.load(path)
        if int(data["tokens"]) == num_tokens and set(layers) <= set(data["layers"].tolist()):
            return config, {layer: (data[f"q{layer}"], data[f"k{layer}"]) for layer in layers}
    config, captured = capture(num_tokens, layers)
    arrays = {f"q{layer}": q for layer, (q, _) in captured.items()}
    arrays.update({f"k{layer}": k for layer, (_, k) in captured.items()})
    np.savez(path, tokens=num_tokens, layers=np.array(layers), **arrays)
    return config, captured


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth, strict=True)]))


def build_index(kind, keys, queries, sinks, window, n_sample, added, block=64):
    """A built index of `kind` and (build seconds, add microseconds per key or None).

    With `added` > 0, the last `added` keys arrive after the build, `block` at a time,
    as during decode: key i (position sinks + i) leaves the window at the decode step of
    position sinks + i + window, whose query comes with it. The build then sees only the
    keys and queries of the shorter prompt that ends where those decode steps begin.
    """
    knob, _, options = SWEEPS[kind]
    index = create_index(kind, keys.shape[1], **options)
    n0 = len(keys) - added
    t0 = time.perf_counter()
    index.build(keys[:n0], queries[: sinks + n0 + window if added else n_sample])
    build_s = time.perf_counter() - t0
    if not added:
        return index, build_s, None
    t0 = time.perf_counter()
    for lo in range(n0, len(keys), block):
        hi = min(lo + block, len(keys))
        index.add(keys[lo:hi], queries[sinks + lo + window : sinks + hi + window])
    return index, build_s, (time.perf_counter() - t0) / added * 1e6


def bench_case(keys, queries, tests, args, rows, case):
    """Build and sweep every kind on one (layer, head); appends result rows.

    `queries` are the prefill queries the index is built from: the head's own, or with
    --grouped its whole GQA group's, position by position (as the engine builds one
    index per KV head)."""
    truth, _ = exact_topk(keys, tests, args.k)
    n_sample = len(queries)
    added = round(args.incremental * len(keys))
    variants = [(kind, 0) for kind in args.kinds]
    if added:
        variants += [(kind, added) for kind in args.kinds if SWEEPS[kind][0] is not None]
    for kind, n_added in variants:
        knob, values, _ = SWEEPS[kind]
        index, build_s, add_us = build_index(
            kind, keys, queries, args.sinks, args.window, n_sample, n_added
        )
        label = f"{kind} +add" if n_added else kind
        # indexes that take seeds are also swept as the engine searches them: each test
        # query (in decode order) seeded with the previous one's result
        for seeded in (False, True) if index.uses_seeds else (False,):
            sweep(index, tests, truth, args, rows, case, label + (" +seeds" if seeded else ""),
                  knob, values, seeded, build_s, add_us)  # fmt: skip


def sweep(index, tests, truth, args, rows, case, label, knob, values, seeded, build_s, add_us):
    """Recall, keys scanned and latency of `index` at each effort value; appends rows."""

    def search_all() -> list:
        results, previous = [], None
        for i in range(len(tests)):
            results.append(index.search(tests[i : i + 1], args.k, previous))
            previous = results[-1].ids if seeded else None
        return results

    for value in values:
        if knob:
            index.configure(**{knob: value})
        index.search(tests[:1], args.k)  # warm-up (first-call compilation)
        latency_ms = float("inf")
        for _ in range(3):  # best of 3: the machine is shared and noisy
            t0 = time.perf_counter()
            results = search_all()
            latency_ms = min(latency_ms, (time.perf_counter() - t0) / len(tests) * 1e3)
        ids = np.concatenate([r.ids for r in results])
        scanned = np.concatenate([r.scanned for r in results])
        rows.append(
            dict(
                case=case, kind=label, knob=knob or "-", value=value if knob else "-",
                recall=recall(ids, truth),
                scanned=float(scanned.mean()) / index.size if scanned.min() >= 0 else None,
                build_s=build_s, add_us=add_us, latency_ms=latency_ms,
                mbytes=index.nbytes / 2**20,
            )
        )  # fmt: skip


def summarize(rows: list[dict]) -> list[dict]:
    """Average over cases for each (kind, effort value)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["knob"], r["value"])].append(r)
    out = []
    for (kind, knob, value), rs in groups.items():
        scanned = [r["scanned"] for r in rs]
        add_us = [r["add_us"] for r in rs]
        out.append(
            dict(
                kind=kind, knob=knob, value=value,
                recall=float(np.mean([r["recall"] for r in rs])),
                min_recall=float(np.min([r["recall"] for r in rs])),
                scanned=None if None in scanned else float(np.mean(scanned)),
                build_s=float(np.mean([r["build_s"] for r in rs])),
                add_us=None if None in add_us else float(np.mean(add_us)),
                latency_ms=float(np.mean([r["latency_ms"] for r in rs])),
                mbytes=float(np.mean([r["mbytes"] for r in rs])),
            )
        )  # fmt: skip
    return out


def table(summary: list[dict], k: int, exact_ms: float) -> str:
    lines = [
        f"| index | effort | recall@{k} (mean / min) | keys scanned | build s | add us/key "
        "| ms/query | latency vs exact | index MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        effort = "-" if s["knob"] == "-" else f"{s['knob']}={s['value']}"
        if s["knob"] != "-" and s["value"] == default_effort(s["kind"].split()[0]):
            effort += " (default)"
        scanned = "n/a" if s["scanned"] is None else f"{100 * s['scanned']:.1f}%"
        add = "-" if s["add_us"] is None else f"{s['add_us']:.1f}"
        lines.append(
            f"| {s['kind']} | {effort} | {s['recall']:.3f} / {s['min_recall']:.3f} | {scanned} "
            f"| {s['build_s']:.2f} | {add} | {s['latency_ms']:.2f} "
            f"| {s['latency_ms'] / exact_ms:.2f}x | {s['mbytes']:.2f} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], k: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = [kind for kind in SWEEPS if kind != "hnswlib"]  # hnswlib: no distance count
    for color, kind in zip(colors, plotted, strict=False):
        for label, style in ((kind, "-"), (f"{kind} +add", "--"), (f"{kind} +seeds", ":")):
            pts = [s for s in summary if s["kind"] == label and s["scanned"] is not None]
            if not pts:
                continue
            pts.sort(key=lambda s: s["scanned"])
            x = [100 * s["scanned"] for s in pts]
            y = [s["recall"] for s in pts]
            ax.plot(x, y, style, marker="o", ms=4, color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("keys scanned per query (% of indexed keys, log scale)")
    ax.set_ylabel(f"recall@{k} of the exact top-{k} attention keys")
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, title="(hnswlib: no distance count)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=8100, help="prompt length (<= 8192)")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    p.add_argument("--heads", type=int, nargs="+", default=[0, 5], help="query heads")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--test", type=int, default=100, help="decode queries: the last N positions")
    p.add_argument("--sinks", type=int, default=128, help="leading keys kept on the device")
    p.add_argument("--window", type=int, default=512, help="recent keys kept on the device")
    p.add_argument("--kinds", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    p.add_argument(
        "--incremental",
        type=float,
        default=0.4,
        help="also measure indexes built on the first keys with this fraction added "
        "afterwards, with their decode queries (0: skip)",
    )
    p.add_argument(
        "--grouped",
        action="store_true",
        help="build each index from the prefill queries of the head's whole GQA group, "
        "as the engine does (one index per KV head); needs --incremental 0",
    )
    p.add_argument("--out", type=Path, default=HERE / "index_recall")
    p.add_argument(
        "--cache",
        type=Path,
        help="npz file holding the captured queries/keys: loaded when it exists (and "
        "matches --tokens/--layers), else written after the capture",
    )
    args = p.parse_args()
    if args.grouped and args.incremental:
        raise SystemExit("--grouped needs --incremental 0")

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    config, captured = cached_capture(args.tokens, args.layers, args.cache)
    print(f"captured {len(args.layers)} layers of a {args.tokens}-token prompt "
          f"in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    group = config.num_heads // config.num_kv_heads
    hi = args.tokens - args.test - args.window
    if hi - args.sinks < 2 * args.k:
        raise SystemExit("too few host-tier keys: raise --tokens or lower --window/--test")

    rows: list[dict] = []
    for layer in args.layers:
        q, k = captured[layer]
        for head in args.heads:
            keys = np.ascontiguousarray(k[head // group, args.sinks : hi])
            if args.grouped:
                first = head // group * group
                own = q[: args.tokens - args.test, first : first + group]
                queries = np.ascontiguousarray(own.reshape(-1, own.shape[-1]))
            else:
                queries = np.ascontiguousarray(q[: args.tokens - args.test, head])
            tests = np.ascontiguousarray(q[args.tokens - args.test :, head])
            case = f"L{layer}H{head}"
            print(f"{case}: {len(keys)} keys, {len(queries)} sample queries, {len(tests)} tests")
            bench_case(keys, queries, tests, args, rows, case)

    summary = summarize(rows)
    exact_ms = next((s["latency_ms"] for s in summary if s["kind"] == "exact"), 1.0)
    md = table(summary, args.k, exact_ms)
    cases = sorted({r["case"] for r in rows})
    n_keys = hi - args.sinks
    title = (
        f"{config.num_layers}-layer default model, {args.tokens}-token real-text prompt;\n"
        f"{n_keys} indexed keys, {args.test} decode queries, cases {', '.join(cases)}"
    )
    print()
    print(md)
    per_case = "\n".join(
        f"| {r['case']} | {r['kind']} | {r['value']} | {r['recall']:.3f} | "
        + ("n/a" if r["scanned"] is None else f"{100 * r['scanned']:.1f}%")
        + " |"
        for r in rows
    )
    args.out.with_suffix(".md").write_text(
        f"# Key-index recall on real attention\n\n{title.replace(chr(10), ' ')}.\n\n"
        f"Command: `.venv/bin/python benchmarks/index_recall.py "
        f"--tokens {args.tokens} --layers {' '.join(map(str, args.layers))} "
        f"--heads {' '.join(map(str, args.heads))} --incremental {args.incremental}"
        f"{' --grouped' if args.grouped else ''}`\n\n"
        "Averaged over the cases (min recall = worst case). Keys scanned: vectors whose "
        "score was computed (IVF: keys in the probed lists, not counting its centroids; "
        "faiss-hnsw: its distance count, averaged over the batch; attention-aware: its "
        "routing centroids, seed keys and expanded keys). `(default)`: the effort the "
        "server uses. `+add` rows: the index was built on a shorter prompt "
        f"and the last {100 * args.incremental:.0f}% of the keys were added afterwards, "
        "64 at a time, with the decode queries of the steps that evicted them from the "
        "window. Latency: one query per call, best of 3 runs; compare ratios, not absolute "
        "times (shared, noisy 2-core machine).\n\n"
        f"{md}\n\n## Per case\n\n| case | index | effort | recall | scanned |\n"
        f"|---|---|---|---|---|\n{per_case}\n"
    )
    plot(summary, args.k, args.out.with_suffix(".png"), title)
    print(f"\nwrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
