"""Comparing greedy runs of the engine in fp32, up to near-ties.

A divergence where either run's top-2 logit gap is below NEAR_TIE (where a different
batch shape or thread split may legitimately flip the argmax) counts as equal.
"""

from __future__ import annotations

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

NEAR_TIE = 1e-4


def run_requests(
    engine: LLMEngine,
    arrivals: dict[int, list[tuple[str, list[int]]]],
    params: SamplingParams,
) -> dict[str, tuple[list[int], list]]:
    """Add requests at the given step numbers, run to completion, and return each
    request's (token ids, logprobs) by id."""
    results: dict[str, tuple[list[int], list]] = {}
    step = 0
    while arrivals or engine.has_unfinished():
        for rid, prompt in arrivals.pop(step, []):
            engine.add_request(rid, prompt, params)
            results[rid] = ([], [])
        for out in engine.step():
            results[out.request_id][0].extend(out.token_ids)
            results[out.request_id][1].extend(out.logprobs)
        step += 1
    return results


def same_greedy(a: tuple[list, list], b: tuple[list, list]) -> bool:
    """Whether two (token ids, logprobs with top-2) runs agree up to a near-tie."""
    (ta, la), (tb, lb) = a, b
    for i, (x, y) in enumerate(zip(ta, tb, strict=True)):
        if x != y:
            gap = min(la[i].top[0][1] - la[i].top[1][1], lb[i].top[0][1] - lb[i].top[1][1])
            return gap < NEAR_TIE
    return True
