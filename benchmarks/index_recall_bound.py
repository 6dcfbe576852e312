"""How much recall@k a query-guided index could reach at a fixed scan budget, with oracles.

Issue 4 asks for recall@100 >= 0.90 while scanning <= 5% of the keys at 8K tokens. This
script asks whether any query-guided candidate scheme of the RoarGraph kind could get
there on our model's attention, giving it two parts for free:

- the m prefill queries nearest to the decode query (cosine), found exactly and not
  counted as scanned; each contributes its exact top-k key list (what an index built
  from prefill queries links the query to);
- optionally, the previous decode step's *exact* top-k as seeds (the engine seeds with
  its previous *result*, whose recall is lower).

Candidates are ranked by seed first, then by how many of the m lists hold them; the top
`budget` fraction of the keys is scored exactly and the best k kept. A real index pays
for finding the neighbours and has imperfect seeds, so it scores below these bounds.
Uses the same capture and host-tier slice as `index_recall.py` (same `--cache` file).

    .venv/bin/python benchmarks/index_recall_bound.py --cache /tmp/capture8100.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from index_recall import cached_capture  # noqa: E402

from retrieval import exact_topk  # noqa: E402


def candidate_recall(
    keys: np.ndarray,
    prefill_lists: np.ndarray,
    prefill_unit: np.ndarray,
    tests: np.ndarray,
    truth: np.ndarray,
    neighbours: int,
    budget: int,
    seeded: bool,
) -> float:
    """Mean recall@k over the decode queries `tests` (in decode order)."""
    k = truth.shape[1]
    hits = 0
    for t, query in enumerate(tests):
        near = np.argpartition(-(prefill_unit @ (query / np.linalg.norm(query))), neighbours)
        votes = np.bincount(prefill_lists[near[:neighbours]].ravel(), minlength=len(keys))
        if seeded and t > 0:
            votes[truth[t - 1]] += neighbours + 1  # seeds rank above every voted key
        candidates = np.flatnonzero(votes)
        if len(candidates) > budget:
            candidates = candidates[np.argsort(-votes[candidates], kind="stable")[:budget]]
        best = candidates[np.argsort(-(keys[candidates] @ query))[:k]]
        hits += len(np.intersect1d(best, truth[t]))
    return hits / (k * len(tests))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=8100)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 15, 27])
    p.add_argument("--heads", type=int, nargs="+", default=[0, 5], help="query heads")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--test", type=int, default=100, help="decode queries: the last N positions")
    p.add_argument("--sinks", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--neighbours", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.03, 0.05, 0.08])
    p.add_argument("--cache", type=Path, help="npz capture shared with index_recall.py")
    args = p.parse_args()

    config, captured = cached_capture(args.tokens, args.layers, args.cache)
    group = config.num_heads // config.num_kv_heads
    hi = args.tokens - args.test - args.window
    results: dict[tuple[bool, int, float], list[float]] = {}
    for layer in args.layers:
        q, k = captured[layer]
        for head in args.heads:
            keys = np.ascontiguousarray(k[head // group, args.sinks : hi])
            first = head // group * group
            prefill = q[: args.tokens - args.test, first : first + group].reshape(-1, q.shape[-1])
            tests = q[args.tokens - args.test :, head]
            truth, _ = exact_topk(keys, tests, args.k)
            prefill_lists, _ = exact_topk(keys, np.ascontiguousarray(prefill), args.k)
            prefill_unit = prefill / np.linalg.norm(prefill, axis=1, keepdims=True)
            for seeded in (False, True):
                for m in args.neighbours:
                    for fraction in args.budgets:
                        budget = int(fraction * len(keys))
                        r = candidate_recall(
                            keys, prefill_lists, prefill_unit, tests, truth, m, budget, seeded
                        )
                        results.setdefault((seeded, m, fraction), []).append(r)
            print(f"L{layer}H{head}: {len(keys)} keys, {len(prefill)} prefill queries", flush=True)

    print(f"\n| seeds (previous exact top-{args.k}) | nearest prefill queries | keys scored "
          f"| mean recall@{args.k} | min over cases |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for (seeded, m, fraction), values in sorted(results.items()):
        print(f"| {'yes' if seeded else 'no'} | {m} | {100 * fraction:.0f}% | "
              f"{np.mean(values):.3f} | {np.min(values):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
