"""Batched decode steps run on one thread or all, whichever is measured faster.

The engine test compares greedy runs in fp32 with the tuner on and off; a divergence
where either run's top-2 logit gap is below 1e-4 (a near-tie, where a product split
differently across threads may legitimately flip the argmax) counts as equal.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from engine.thread_tuner import ThreadTuner
from tests.support.greedy import run_requests, same_greedy


def _run(tuner: ThreadTuner, kind: int, cost: dict[int, float], steps: int) -> list[int]:
    """`steps` steps of `kind` whose seconds per token are cost[threads]; the counts used."""
    used = []
    for _ in range(steps):
        threads = tuner.choose(kind)
        tuner.record(kind, threads, cost[threads] * 4, tokens=4)
        used.append(threads)
    return used


def test_measures_both_then_runs_on_the_faster_and_probes_the_other():
    tuner = ThreadTuner(all_threads=2, probe_every=4)
    used = _run(tuner, kind=3, cost={2: 0.010, 1: 0.020}, steps=12)
    assert used[:2] == [2, 1]  # each count once
    assert tuner.best(3) == 2
    # steps 3..12: all threads, except every 4th step of the kind (4, 8, 12) on one
    assert used[2:] == [2, 1, 2, 2, 2, 1, 2, 2, 2, 1]


def test_switches_when_the_faster_slows_down_and_back(caplog):
    tuner = ThreadTuner(all_threads=2, probe_every=4)
    _run(tuner, kind=5, cost={2: 0.010, 1: 0.020}, steps=8)
    assert tuner.best(5) == 2
    with caplog.at_level(logging.INFO, logger="engine.thread_tuner"):
        slow = _run(tuner, kind=5, cost={2: 0.050, 1: 0.020}, steps=7)
    assert tuner.best(5) == 1
    assert slow == [2, 1, 1, 2, 1, 1, 1]  # switched after one slow step; 12th: a probe
    assert any("now run on 1 thread" in r.getMessage() for r in caplog.records)
    _run(tuner, kind=5, cost={2: 0.010, 1: 0.020}, steps=40)  # probes bring it back
    assert tuner.best(5) == 2


def test_kinds_are_tuned_apart_and_bad_settings_refused():
    tuner = ThreadTuner(all_threads=4, probe_every=8)
    _run(tuner, tuner.kind(16), {4: 0.03, 1: 0.01}, steps=3)
    _run(tuner, tuner.kind(2), {4: 0.01, 1: 0.03}, steps=3)
    assert tuner.kind(16) != tuner.kind(2) == tuner.kind(3)
    assert (tuner.best(tuner.kind(16)), tuner.best(tuner.kind(2))) == (1, 4)
    assert tuner.best(tuner.kind(64)) is None
    assert _run(ThreadTuner(all_threads=1), 1, {1: 0.01}, steps=20) == [1] * 20
    for bad in (dict(all_threads=0), dict(all_threads=2, probe_every=1)):
        with pytest.raises(ValueError):
            ThreadTuner(**bad)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_engine_runs_decode_batches_as_the_tuner_says(default_model_dir, two_threads):
    """fp32, the default model, two threads: prefill and lone decode steps as before;
    each step decoding both sequences runs on the tuner's pick, which tries both counts;
    the tokens are those of a run with the tuner off (up to near-ties)."""
    engine = LLMEngine.from_config(EngineConfig(model=str(default_model_dir), num_threads=2))
    tuner = engine.runner.decode_tuner
    assert isinstance(tuner, ThreadTuner) and tuner.candidates == (2, 1)
    tuner.probe_every = 3
    seen: list[tuple[int, int]] = []  # (tokens in the step, torch threads during it)
    engine.runner.model.register_forward_pre_hook(
        lambda _module, args: seen.append((args[0].numel(), torch.get_num_threads()))
    )
    prompts = [engine.tokenizer.encode(t) for t in ("The printing press", "Rivers of Europe")]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    arrivals = {0: [("a", prompts[0]), ("b", prompts[1])]}
    tuned = run_requests(engine, dict(arrivals), params)
    batched = [n for tokens, n in seen if tokens == 2]
    assert len(batched) == 11 and set(batched) == {1, 2}
    assert batched[:2] == [2, 1]
    best = tuner.best(tuner.kind(2))
    assert best in (1, 2) and batched[-1] in (1, 2)
    assert all(n == 2 for tokens, n in seen if tokens > 2)  # the prefill

    engine.runner.decode_tuner = None
    seen.clear()
    fixed = run_requests(engine, dict(arrivals), params)
    assert all(n == 2 for _, n in seen)
    for rid in ("a", "b"):
        assert same_greedy(tuned[rid], fixed[rid]), rid


def test_flag_and_config_turn_it_off(default_model_dir, two_threads):
    from server.cli import _engine_config, build_parser

    args = build_parser().parse_args(
        ["serve", str(default_model_dir), "--no-adaptive-decode-threads"]
    )
    config = _engine_config(args)
    assert config.adaptive_decode_threads is False
    config.num_threads = 2
    assert LLMEngine.from_config(config).runner.decode_tuner is None
