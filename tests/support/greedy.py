"""Comparing greedy runs of the engine in fp32, up to near-ties.

A divergence where either run's top-2 logit gap is below NEAR_TIE (where a different
batch shape or thread split may legitimately flip the argmax) counts as equal.
"""

from __future__ import annotations

NEAR_TIE = 1e-4


def same_greedy(a: tuple[list, list], b: tuple[list, list]) -> bool:
    """Whether two (token ids, logprobs with top-2) runs agree up to a near-tie."""
    (ta, la), (tb, lb) = a, b
    for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
        if x != y:
            gap = min(la[i].top[0][1] - la[i].top[1][1], lb[i].top[0][1] - lb[i].top[1][1])
            return gap < NEAR_TIE
    return True
