"""A lone sequence's decode steps run on `single_decode_threads` torch threads.

Greedy runs on one thread and on all are compared in fp32; a divergence where either
run's top-2 logit gap is below 1e-4 (a near-tie, where a product split differently
across threads may legitimately flip the argmax) counts as equal.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.model_config import ModelConfig
from engine.model_runner import (
    SINGLE_THREAD_MAX_WEIGHT_BYTES,
    auto_single_decode_threads,
    torch_threads,
)
from engine.sampling_params import SamplingParams
from tests.support.greedy import run_requests, same_greedy

CPU = torch.device("cpu")


def test_auto_is_one_thread_for_small_cpu_models_only(default_model_dir):
    config = ModelConfig.from_dir(default_model_dir)
    assert auto_single_decode_threads(config, torch.float32, CPU) == 1
    assert auto_single_decode_threads(config, torch.bfloat16, CPU) == 1
    # 135M parameters: ~0.5 GiB in float32, so 3x the layers is past the limit.
    deeper = dataclasses.replace(config, num_layers=3 * config.num_layers)
    assert 4 * 3 * 135e6 > SINGLE_THREAD_MAX_WEIGHT_BYTES
    assert auto_single_decode_threads(deeper, torch.float32, CPU) == 0
    assert auto_single_decode_threads(config, torch.float32, torch.device("cuda")) == 0


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("restored on the way out too")
    assert torch.get_num_threads() == before


def test_config_rejects_negative_counts():
    with pytest.raises(ValueError, match="single_decode_threads"):
        EngineConfig(single_decode_threads=-1).validate()


def _greedy(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, tuple[list, list]]:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    return run_requests(engine, {0: list(prompts.items())}, params)


def test_lone_decode_runs_on_one_thread_and_gives_the_same_tokens(default_model_dir):
    engine = LLMEngine.from_config(EngineConfig(model=str(default_model_dir)))
    assert engine.runner.single_decode_threads == 1  # the default model, on the CPU
    seen: list[tuple[int, int]] = []  # (tokens in the step, torch threads during it)
    engine.runner.model.register_forward_pre_hook(
        lambda _module, args: seen.append((args[0].numel(), torch.get_num_threads()))
    )
    everyone = torch.get_num_threads()
    prompt = engine.tokenizer.encode("The history of the printing press begins")
    lone = _greedy(engine, {"a": prompt})
    assert [n for tokens, n in seen if tokens == 1] == [1] * 9  # every decode step
    assert all(n == everyone for tokens, n in seen if tokens > 1)  # the prefill

    seen.clear()
    engine.runner.decode_tuner = None  # adaptive decode threads off (tests/test_thread_tuner.py)
    _greedy(engine, {"a": prompt, "b": prompt[:5]})
    assert all(n == everyone for _, n in seen)  # batched steps keep every thread

    engine.runner.single_decode_threads = 0
    seen.clear()
    all_threads = _greedy(engine, {"a": prompt})
    assert all(n == everyone for _, n in seen)
    assert same_greedy(lone["a"], all_threads["a"])
