"""Sampler: greedy, temperature, top-k/top-p/min-p, penalties, logit_bias, seeds, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.sampler import SamplingRow, make_generator, process_logits, sample
from engine.sampling_params import SamplingParams


def row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    eos: frozenset[int] = frozenset(),
    **params,
) -> SamplingRow:
    return SamplingRow(
        params=SamplingParams(**params),
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
        generator=generator,
        eos_token_ids=eos,
    )


def logits_for(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)


def draw_many(logits: torch.Tensor, n: int, seed: int = 0, **params) -> Counter:
    """n draws of the same one-row distribution; one shared generator keeps it deterministic."""
    generator = make_generator(seed)
    rows = [row(generator=generator, **params) for _ in range(n)]
    tokens, _ = sample(logits.expand(n, -1), rows)
    return Counter(tokens)


def test_greedy_is_argmax_and_input_untouched():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    tokens, logprobs = sample(logits, [row(temperature=0) for _ in range(5)])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 5
    assert torch.equal(logits, before)


def test_mixed_greedy_and_random_rows():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    rows = [row(temperature=0), row(seed=1, top_k=1), row(temperature=0), row(seed=2, top_k=1)]
    for r in rows:
        r.generator = make_generator(r.params.seed)
    tokens, _ = sample(logits, rows)
    # top_k=1 leaves only the argmax, so every row must pick it.
    assert tokens == logits.argmax(dim=-1).tolist()


def test_temperature_distribution_matches():
    probs = [0.6, 0.3, 0.1]
    counts = draw_many(logits_for(probs), 4000, seed=3)
    for token, p in enumerate(probs):
        assert abs(counts[token] / 4000 - p) < 0.03
    # Temperature 0.5 squares the probabilities before renormalising.
    sharpened = [p**2 / sum(q**2 for q in probs) for p in probs]
    counts = draw_many(logits_for(probs), 4000, seed=4, temperature=0.5)
    for token, p in enumerate(sharpened):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_top_k_restricts_support():
    logits = torch.randn(1, 200, generator=torch.Generator().manual_seed(5))
    counts = draw_many(logits, 2000, seed=6, top_k=3, temperature=5.0)
    assert set(counts) == set(logits[0].topk(3).indices.tolist())


PROBS = [0.5, 0.3, 0.1, 0.06, 0.04]


def test_top_p_restricts_support():
    # Smallest tokens summing to at most 1 - top_p = 0.25 are dropped: 0.04, 0.06, 0.1.
    counts = draw_many(logits_for(PROBS), 2000, seed=7, top_p=0.75)
    assert set(counts) == {0, 1}
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.04


def test_min_p_restricts_support():
    # Threshold 0.15 * 0.5 = 0.075 keeps 0.5, 0.3 and 0.1.
    counts = draw_many(logits_for(PROBS), 2000, seed=8, min_p=0.15)
    assert set(counts) == {0, 1, 2}


def test_top_k_top_p_min_p_combined_per_row():
    generator = make_generator(9)
    kinds = [dict(top_k=2), dict(top_p=0.75, top_k=4), dict(min_p=0.5), dict(top_k=4)]
    rows = [row(generator=generator, **kinds[i % 4]) for i in range(800)]
    tokens, _ = sample(logits_for(PROBS).expand(800, -1), rows)
    supports = [set(tokens[k::4]) for k in range(4)]
    assert supports == [{0, 1}, {0, 1}, {0, 1}, {0, 1, 2, 3}]


def test_penalties_match_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    r = row(
        prompt=[0],
        output=[1, 1, 2],
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    out = process_logits(logits, [r])[0].tolist()
    expected = [
        2.0 / 2,  # prompt only, positive: divided by the repetition penalty
        -1.0 * 2 - 0.25 * 2 - 0.5,  # output twice, negative: multiplied, then freq + presence
        0.5 / 2 - 0.25 * 1 - 0.5,
        3.0,  # never seen
        -2.0,
    ]
    assert out == pytest.approx(expected)


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    r = row(prompt=[0, 0, 3], output=[1], presence_penalty=1.0, frequency_penalty=-0.5)
    assert process_logits(logits, [r])[0].tolist() == pytest.approx([0.0, -0.5, 0.0, 0.0])


def test_penalty_rows_are_independent():
    logits = torch.ones(2, 3)
    rows = [row(output=[0], frequency_penalty=1.0), row(output=[2])]
    assert process_logits(logits, rows).tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]


def test_logit_bias_forces_token():
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(10))
    weakest = int(logits[0].argmin())
    rows = [
        row(temperature=0, logit_bias={weakest: 100}),
        row(seed=11, logit_bias={weakest: 100}, generator=make_generator(11)),
    ]
    assert sample(logits, rows)[0] == [weakest, weakest]
    banned = int(logits[0].argmax())
    tokens, _ = sample(logits[:1], [row(temperature=0, logit_bias={banned: -100})])
    assert tokens[0] != banned


def test_logit_bias_out_of_vocab_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        sample(torch.zeros(1, 10), [row(logit_bias={10: 1.0})])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        sample(torch.zeros(10), [row()])
    with pytest.raises(ValueError, match="rows"):
        sample(torch.zeros(2, 10), [row()])


def _run_seeded(seed: int, companions: list[SamplingRow], position: int, steps: int) -> list[int]:
    """Tokens of a seeded row decoded for `steps` steps alongside other rows."""
    logits_gen = torch.Generator().manual_seed(123)
    step_logits = [torch.randn(1, 500, generator=logits_gen) for _ in range(steps)]
    target = row(seed=seed, top_p=0.95, temperature=1.3)
    target.generator = make_generator(seed)
    batch = companions[:position] + [target] + companions[position:]
    out = []
    for logits in step_logits:
        noise = torch.randn(len(batch), 500)
        noise[position] = logits[0]
        tokens, _ = sample(noise, batch)
        out.append(tokens[position])
        target.output_token_ids.append(tokens[position])
    return out


def test_seed_reproducible_across_batch_compositions():
    alone = _run_seeded(42, [], 0, steps=8)
    companions = [
        row(temperature=0.7),
        row(seed=7, top_k=5, generator=make_generator(7)),
        row(temperature=0),
    ]
    torch.manual_seed(0)
    assert _run_seeded(42, companions, 1, steps=8) == alone
    torch.manual_seed(1)
    assert _run_seeded(42, companions[:1], 1, steps=8) == alone
    assert _run_seeded(43, [], 0, steps=8) != alone


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 9] = 50.0  # eos
    logits[0, 8] = 40.0  # a stop token
    params = dict(temperature=0, min_tokens=3, stop_token_ids=[8], eos=frozenset({9}))
    blocked = row(output=[1, 2], **params)
    assert sample(logits, [blocked])[0] == [0]
    allowed = row(output=[1, 2, 3], **params)
    assert sample(logits, [allowed])[0] == [9]
    # vLLM masks eos during min_tokens even with ignore_eos.
    ignoring = row(output=[], ignore_eos=True, **params)
    assert sample(logits, [ignoring])[0] == [0]


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(12))
    rows = [
        row(logprobs=5, seed=1, generator=make_generator(1), temperature=0.5, top_k=10),
        row(logprobs=0, temperature=0, repetition_penalty=1.5, output=[3]),
        row(temperature=0),
    ]
    tokens, logprobs = sample(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    first, second, third = logprobs
    assert third is None
    assert first.token_id == tokens[0]
    assert first.logprob == pytest.approx(expected[0, tokens[0]].item(), abs=1e-6)
    assert len(first.top) == 5
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True)
    top5 = expected[0].topk(5)
    assert [t for t, _ in first.top] == top5.indices.tolist()
    assert values == pytest.approx(top5.values.tolist(), abs=1e-6)
    assert second.top == []
    assert second.logprob == pytest.approx(expected[1, tokens[1]].item(), abs=1e-6)
    assert math.isfinite(second.logprob)


def test_make_generator():
    assert make_generator(None) is None
    a = torch.rand(3, generator=make_generator(5))
    b = torch.rand(3, generator=make_generator(5))
    assert torch.equal(a, b)
    assert make_generator(-1) is not None
