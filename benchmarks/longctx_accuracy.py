"""Long-context accuracy on RULER-style tasks: full vs retrieval (per index) vs streaming.

Every task x length x depth instance (see `ruler_tasks.py`) runs greedily through the
default model in each attention mode; the score is RULER's string-match-all. Prints a
table (task x length x mode, averaged over depths), writes the per-instance results as
JSON and a depth-by-length heatmap PNG per mode. Usage:

    .venv/bin/python benchmarks/longctx_accuracy.py [--lengths 2048 4096 8000]
        [--depths 10] [--modes full retrieval:attention-aware streaming]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from engine.llm import LLM
from engine.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from ruler_tasks import TASKS, make_instances, string_match_all  # noqa: E402

HERE = Path(__file__).parent


def parse_mode(spec: str) -> tuple[str, str]:
    """'retrieval:faiss-ivf' -> ('retrieval', 'faiss-ivf'); a bare mode uses 'exact'."""
    mode, _, index = spec.partition(":")
    return mode, index or "exact"


def run_mode(spec: str, instances, max_num_seqs: int) -> list[float]:
    mode, index = parse_mode(spec)
    llm = LLM(None, attention=mode, index=index, max_num_seqs=max_num_seqs)
    scores = []
    by_budget = defaultdict(list)
    for i, inst in enumerate(instances):
        by_budget[inst.max_tokens].append(i)
    outputs: dict[int, str] = {}
    for max_tokens, idx in by_budget.items():
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        results = llm.generate([instances[i].prompt for i in idx], params, use_tqdm=True)
        for i, r in zip(idx, results, strict=True):
            outputs[i] = r.outputs[0].text
    for i, inst in enumerate(instances):
        scores.append(string_match_all(outputs[i], inst.answers))
    return scores, [outputs[i] for i in range(len(instances))]


def heatmap(spec: str, instances, scores, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({i.length for i in instances})
    depths = sorted({i.depth for i in instances})
    grid = [[0.0] * len(lengths) for _ in depths]
    counts = [[0] * len(lengths) for _ in depths]
    for inst, s in zip(instances, scores, strict=True):
        r, c = depths.index(inst.depth), lengths.index(inst.length)
        grid[r][c] += s
        counts[r][c] += 1
    grid = [
        [g / max(n, 1) for g, n in zip(row, cr, strict=True)]
        for row, cr in zip(grid, counts, strict=True)
    ]
    fig, ax = plt.subplots(figsize=(4 + len(lengths), 5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{spec}: string-match-all, mean over tasks")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--depths", type=int, default=10)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument(
        "--modes", nargs="+", default=["full", "retrieval:attention-aware", "streaming"]
    )
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "longctx_accuracy")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    probe = LLM(None, max_num_seqs=1)
    instances = make_instances(probe.tokenizer, args.tasks, args.lengths, args.depths, args.seed)
    del probe
    results = {}
    for spec in args.modes:
        start = time.monotonic()
        scores, outputs = run_mode(spec, instances, args.max_num_seqs)
        results[spec] = {"scores": scores, "outputs": outputs, "seconds": time.monotonic() - start}
        heatmap(spec, instances, scores, args.out / f"heatmap_{spec.replace(':', '_')}.png")

    print(f"\nstring-match-all (%), mean over {args.depths} depths")
    header = f"{'task':<18} {'length':>6} " + " ".join(f"{m:>26}" for m in args.modes)
    print(header)
    for task in args.tasks:
        for length in args.lengths:
            idx = [i for i, x in enumerate(instances) if x.task == task and x.length == length]
            row = [100 * sum(results[m]["scores"][i] for i in idx) / len(idx) for m in args.modes]
            print(f"{task:<18} {length:>6} " + " ".join(f"{v:>26.1f}" for v in row))
    for m in args.modes:
        print(f"{m}: {results[m]['seconds']:.0f} s")
    dump = {
        "instances": [
            {"task": x.task, "length": x.length, "depth": x.depth, "answers": x.answers}
            for x in instances
        ],
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(dump, indent=1) + "\n")


if __name__ == "__main__":
    main()
