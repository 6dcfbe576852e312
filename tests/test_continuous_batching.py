"""Continuous batching, chunked prefill, abort and preemption on the real engine.

Greedy runs of a request batched with others and alone are compared in fp32; a
divergence where either run's top-2 logit gap is below 1e-4 (a near-tie, where the
batch shape may legitimately flip the argmax) counts as equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from tests.support.greedy import run_requests, same_greedy


def _engine(model_dir, **overrides) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), **overrides))


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (length,), generator=gen).tolist()


def _params(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)


def _alone(engine: LLMEngine, prompt: list[int], params):
    return run_requests(engine, {0: [("alone", prompt)]}, params)["alone"]


@pytest.mark.parametrize("attention", ["full", "retrieval"])
def test_32_staggered_requests_match_running_alone(tiny_model_dir, attention):
    engine = _engine(
        tiny_model_dir,
        attention=attention,
        max_num_batched_tokens=1024,
        sink_tokens=32,
        window_tokens=128,
        top_k=10**6,
    )
    lengths = np.geomspace(10, 6000, 32).astype(int).tolist()
    prompts = {f"r{i}": _prompt(n, i) for i, n in enumerate(lengths)}
    rng = np.random.default_rng(0)
    order = rng.permutation(len(lengths))
    arrivals: dict[int, list] = {}
    for k, i in enumerate(order):  # a few new requests every other step
        arrivals.setdefault(2 * (k // 4), []).append((f"r{i}", prompts[f"r{i}"]))
    params = _params()
    batched = run_requests(engine, arrivals, params)
    assert engine.memory_stats()["device_bytes"] == 0
    for rid, prompt in prompts.items():
        alone = _alone(engine, prompt, params)
        assert len(batched[rid][0]) == 12
        assert same_greedy(batched[rid], alone), rid


def test_running_sequences_decode_while_a_long_prompt_prefills(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_num_batched_tokens=512)
    params = _params(max_tokens=40)
    for i in range(4):
        engine.add_request(f"short{i}", _prompt(20, i), params)
    engine.step()  # the short prompts are prefilled and decoding
    engine.add_request("long", _prompt(6000, 99), _params(max_tokens=2))
    long_seq = engine._requests["long"][0]
    interleaved = 0
    while long_seq.num_computed < len(long_seq.prompt_token_ids) - 1:
        before = long_seq.num_computed
        produced = {o.request_id for o in engine.step()}
        if long_seq.num_computed > before and {f"short{i}" for i in range(4)} <= produced:
            interleaved += 1  # one chunk of the long prompt and a token for every short one
    # 6000 tokens at < 512 per step is at least 11 chunks, each shared with the decodes
    assert interleaved >= 11


def test_aborting_half_returns_memory_to_the_starting_figure(tiny_model_dir):
    engine = _engine(tiny_model_dir, attention="retrieval", sink_tokens=16, window_tokens=32)
    start = engine.memory_stats()
    params = _params(max_tokens=200)
    for i in range(16):
        engine.add_request(f"r{i}", _prompt(100 + 10 * i, i), params)
    for _ in range(5):
        engine.step()
    mid = engine.memory_stats()
    assert mid["host_bytes"] > 0 and mid["device_bytes"] > 0
    for i in range(0, 16, 2):
        assert engine.abort(f"r{i}")
    after_abort = engine.memory_stats()
    assert 0 < after_abort["device_bytes"] < mid["device_bytes"]
    for i in range(1, 16, 2):
        engine.abort(f"r{i}")
    assert engine.memory_stats() == start
    assert not engine.has_unfinished()


def test_preemption_under_a_small_device_budget_still_completes_correctly(tiny_model_dir):
    params = _params(max_tokens=24)
    prompts = {f"r{i}": _prompt(300 + 50 * i, 500 + i) for i in range(6)}
    reference = _engine(tiny_model_dir)
    alone = {rid: _alone(reference, p, params) for rid, p in prompts.items()}

    # Room for the first three prompts plus a few tokens: their decodes soon overflow it.
    budget = sum(len(p) for p in list(prompts.values())[:3]) + 5
    engine = _engine(tiny_model_dir, max_device_tokens=budget)
    seqs = []
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
        seqs.extend(engine._requests[rid])
    results = {rid: ([], []) for rid in prompts}
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id][0].extend(out.token_ids)
            results[out.request_id][1].extend(out.logprobs)
    assert sum(s.num_preemptions for s in seqs) > 0
    for rid in prompts:
        assert len(results[rid][0]) == 24
        assert same_greedy(results[rid], alone[rid]), rid
    assert engine.memory_stats()["device_bytes"] == 0
