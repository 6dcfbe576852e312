"""The offline API on the real default model: answers, reproducibility, stops, errors."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams


def test_chat_answers_capital_of_france(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=30, temperature=0),
    )
    completion = out[0].outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"


def test_greedy_batch_equals_each_alone(llm):
    prompts = ["The quick brown fox", "In 1492, Columbus", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=12, temperature=0)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_same_seed_same_output_and_different_seed_differs(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    first = llm.generate("Once upon a time", params)[0].outputs[0].text
    mixed = llm.generate(["Another prompt in the batch", "Once upon a time"], params)
    assert mixed[1].outputs[0].text == first
    other = llm.generate("Once upon a time", SamplingParams(max_tokens=16, seed=99))
    assert other[0].outputs[0].text != first


def test_n_samples_are_distinct_and_complete(llm):
    out = llm.generate("My favourite colour is", SamplingParams(n=3, max_tokens=8, seed=7))
    samples = out[0].outputs
    assert [s.index for s in samples] == [0, 1, 2]
    assert all(len(s.token_ids) == 8 and s.finish_reason == "length" for s in samples)
    assert len({s.text for s in samples}) > 1


def test_stop_string_ends_output_and_is_not_included(llm):
    greedy = SamplingParams(max_tokens=40, temperature=0)
    full = llm.generate("Count: one, two, three, four, five, six,", greedy)[0].outputs[0].text
    stop = full.strip().split()[1]  # a word the model really produces
    out = llm.generate(
        "Count: one, two, three, four, five, six,",
        SamplingParams(max_tokens=40, temperature=0, stop=[stop]),
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text
    assert full.startswith(out.text)


def test_logprobs_are_returned_per_token(llm):
    out = llm.generate("Hello", SamplingParams(max_tokens=5, temperature=0, logprobs=3))
    completion = out[0].outputs[0]
    assert len(completion.logprobs) == 5
    for token, lp in zip(completion.token_ids, completion.logprobs, strict=True):
        assert lp.token_id == token
        assert len(lp.top) == 3
        # greedy picks the most likely token, so its logprob is the top one
        assert lp.top[0][0] == token and lp.logprob == pytest.approx(lp.top[0][1])


def test_max_tokens_and_ignore_eos(llm):
    out = llm.generate("Hi", SamplingParams(max_tokens=25, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 25
    assert out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "kwargs", "field"),
    [
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ("hi", {"max_tokens": -1}, "max_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"n": 0}, "n"),
        ([10**9], {}, "prompt"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(llm, prompt, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt, SamplingParams(**kwargs))
    assert not llm.engine.has_unfinished()


def test_prompt_longer_than_context_is_rejected(llm):
    too_long = [1] * (llm.engine.max_model_len + 5)
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(too_long, SamplingParams(max_tokens=1))
    fits = [1] * (llm.engine.max_model_len - 4)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate(fits, SamplingParams(max_tokens=10))
    assert not llm.engine.has_unfinished()
    assert llm.engine.memory_stats()["device_bytes"] == 0
