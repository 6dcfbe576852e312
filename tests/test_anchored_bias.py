"""Anchored-bias profiles: format, calibration, per-request application, the server field.

Engine tests use the real default model. Greedy outputs of a mixed batch are compared
with each request run alone: logprobs within 1e-4 (fp32), and a token that differs only
where the top-2 logprob gap is below 1e-4 (a near-tie) counts as equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from engine.bias_calibrate import CalibrationConfig, calibrate, calibrate_grid
from engine.bias_profile import BiasProfile, load_profile, save_profile
from engine.llm_engine import EngineConfig, LLMEngine
from engine.lofit_adapter import LofitAdapter, save_adapter
from engine.mc_data import MCItem, format_prompt, read_jsonl, read_truthfulqa_csv
from engine.mc_eval import evaluate, letter_logits
from engine.model_config import ModelConfig
from engine.sampling_params import SamplingParams
from tests.support.server_process import ServerProcess

BASE = "SmolLM2-135M-Instruct"
REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "benchmarks" / "results" / "anchored_bias_profile_r3"
VAL = REPO.parent / "shared" / "data" / "truthfulqa" / "val.csv"

QUESTIONS = [
    MCItem("What is the capital of France?", ("Paris", "Rome", "Berlin", "Madrid"), 0),
    MCItem("How many legs does a spider have?", ("Six", "Eight", "Ten", "Four"), 1),
]


def _synthetic_profile(seed: int = 0, base: str = BASE) -> BiasProfile:
    g = torch.Generator().manual_seed(seed)
    return BiasProfile(
        base_model=base,
        letters=["A", "B", "C", "D"],
        letter_token_ids=[330, 389, 340, 422],
        neurons=[(5, 10), (20, 100), (29, 499)],
        neuron_scales=torch.tensor([0.0, 2.0, -1.0]),
        heads=[(10, 2), (28, 0)],
        head_offsets=torch.randn(2, 64, generator=g),
        prior=torch.tensor([0.4, 0.1, 0.3, 0.2]),
        calibration={"note": "synthetic"},
    )


@pytest.fixture(scope="module")
def engine(default_model_dir, tmp_path_factory) -> LLMEngine:
    """The default model with tiny device tiers, so retrieval/streaming rows use the host
    tier on short prompts; a synthetic profile and a LoFiT adapter are loaded later."""
    return LLMEngine.from_config(EngineConfig(sink_tokens=4, window_tokens=16, top_k=8))


@pytest.fixture(scope="module")
def loaded(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("bias")
    save_profile(_synthetic_profile(), root / "prof")
    engine.load_bias_profile("default", str(root / "prof"))
    g = torch.Generator().manual_seed(3)
    heads = [(4, 1), (16, 5), (25, 7)]
    adapter = LofitAdapter(
        BASE, heads, torch.randn(3, 64, generator=g) * 0.3, torch.randn(3, 64, generator=g)
    )
    save_adapter(adapter, root / "ad")
    engine.load_lofit("ad", str(root / "ad"))
    yield engine


def _prompt_ids(engine, item: MCItem) -> list[int]:
    return engine.tokenizer.encode(format_prompt(item))


# -- the format ---------------------------------------------------------------------------------


def test_profile_round_trip(tmp_path, default_model_dir):
    config = ModelConfig.from_dir(default_model_dir)
    profile = _synthetic_profile()
    save_profile(profile, tmp_path / "p")
    back = load_profile(tmp_path / "p", config, BASE)
    assert back.neurons == profile.neurons and back.heads == profile.heads
    assert back.letters == profile.letters and back.letter_token_ids == profile.letter_token_ids
    for name in ("neuron_scales", "head_offsets", "prior"):
        assert torch.equal(getattr(back, name), getattr(profile, name))
    assert back.calibration == {"note": "synthetic"}
    bias = back.prior_logit_bias()
    assert bias[389] > bias[330]  # the rarer prior letter is pushed up
    assert abs(sum(bias.values())) < 1e-9  # centred


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c, t: c.update(format="lofit"), "not a bias profile"),
        (lambda c, t: c.pop("heads"), "missing heads"),
        (lambda c, t: c.update(neurons=[[0, 10**6], [1, 2], [2, 3]]), "out of range"),
        (lambda c, t: c.update(heads=[[0, 1, 2], [3, 4]]), "pairs"),
        (lambda c, t: t.update(prior=torch.tensor([0.5, 0.5, 0.5, 0.5])), "sum to 1"),
        (lambda c, t: t.update(neuron_scales=torch.ones(2)), "neuron_scales must have shape"),
        (lambda c, t: t.update(head_offsets=torch.full((2, 64), float("nan"))), "NaN"),
        (lambda c, t: t.pop("prior"), "no tensor prior"),
        (lambda c, t: c.update(base_model="gpt2"), "calibrated for base model 'gpt2'"),
    ],
)
def test_load_rejects_malformed_profiles(tmp_path, default_model_dir, edit, match):
    from safetensors.torch import load_file, save_file

    save_profile(_synthetic_profile(), tmp_path)
    config = json.loads((tmp_path / "bias_profile.json").read_text())
    tensors = load_file(str(tmp_path / "bias_profile.safetensors"))
    edit(config, tensors)
    (tmp_path / "bias_profile.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "bias_profile.safetensors"))
    with pytest.raises(ValueError, match=match):
        load_profile(tmp_path, ModelConfig.from_dir(default_model_dir), BASE)


def test_load_rejects_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_profile(tmp_path / "missing")
    save_profile(_synthetic_profile(), tmp_path)
    (tmp_path / "bias_profile.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_profile(tmp_path)
    save_profile(_synthetic_profile(), tmp_path)
    (tmp_path / "bias_profile.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path)


def test_data_readers(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"question": "Q?", "options": ["x", "y", "z"], "answer": 2}) + "\n")
    (item,) = read_jsonl(path)
    assert format_prompt(item) == "Question: Q?\nAnswer Choices:\nA: x\nB: y\nC: z\nAnswer:"
    assert [r.options[r.answer] for r in item.rotations()] == ["z"] * 3
    assert [r.answer for r in item.rotations()] == [2, 1, 0]
    path.write_text(json.dumps({"question": "Q?", "options": ["x"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match="items.jsonl:1"):
        read_jsonl(path)
    csv = tmp_path / "tqa.csv"
    csv.write_text(
        "Question,Best Answer,Incorrect Answers\n"
        'Q1?,good,"bad1; bad2; bad3; bad4"\n'
        "Q2?,good,bad1; bad2\n"  # too few incorrect answers for 4 options: skipped
    )
    items = read_truthfulqa_csv(csv)
    assert len(items) == 4 and sorted(it.answer for it in items) == [0, 1, 2, 3]
    assert all(it.options[it.answer] == "good" and "bad4" not in it.options for it in items)
    assert read_truthfulqa_csv(csv) == items  # fixed seed


# -- per-request application --------------------------------------------------------------------


def test_rows_without_the_field_are_bit_identical(engine, default_model_dir, tmp_path):
    prompts = [_prompt_ids(engine, q) for q in QUESTIONS]
    vocab = list(range(engine.model_config.vocab_size))
    fresh = LLMEngine.from_config(EngineConfig())  # no profile ever loaded
    expected = letter_logits(fresh, prompts, vocab)
    save_profile(_synthetic_profile(1), tmp_path / "p")
    engine.load_bias_profile("other", str(tmp_path / "p"))
    try:
        assert torch.equal(letter_logits(engine, prompts, vocab), expected)
        corrected = letter_logits(engine, prompts, vocab, "anchored:other")
        assert (corrected - expected).abs().max() > 1e-2  # the profile does act
    finally:
        engine.bias.unregister("other")


def _run(engine, requests):
    """Greedy-run (prompt, options) requests in one batch; (tokens, logprobs) per row."""
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=5)
    results = {}
    for i, (prompt, opts) in enumerate(requests):
        rid = f"r{i}-{id(results)}"
        engine.add_request(rid, prompt, params, **opts)
        results[rid] = ([], [])
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id][0].extend(out.token_ids)
            results[out.request_id][1].extend(out.logprobs)
    return list(results.values())


def _assert_same(a, b, tol=1e-4):
    for i, (x, y) in enumerate(zip(a[1], b[1], strict=True)):
        if a[0][i] != b[0][i]:
            gaps = [row.top[0][1] - row.top[1][1] for row in (x, y)]
            assert min(gaps) < tol, "tokens differ without a near-tie"
            return  # a near-tie: the continuations may differ from here on
        assert abs(x.logprob - y.logprob) < tol
        assert {t for t, _ in x.top} == {t for t, _ in y.top}
        top_y = dict(y.top)
        assert all(abs(lp - top_y[t]) < tol for t, lp in x.top)


def test_mixed_batch_rows_match_each_row_alone(loaded):
    engine = loaded
    p0, p1 = (_prompt_ids(engine, q) for q in QUESTIONS)
    requests = [
        (p0, {}),
        (p0, {"bias_correction": "anchored"}),
        (p0, {"bias_correction": "prior"}),
        (p1, {"lofit": "ad"}),
        (p1, {"lofit": "ad", "bias_correction": "anchored:default"}),
        (p1, {"attention": "retrieval", "bias_correction": "anchored"}),
        (p0, {"attention": "streaming", "bias_correction": "anchored"}),
        (p0, {"attention": "retrieval"}),
        (p1, {"attention": "streaming", "bias_correction": "prior"}),
    ]
    batched = _run(engine, requests)
    for request, row in zip(requests, batched, strict=True):
        _assert_same(row, _run(engine, [request])[0])
    first = [row[1][0] for row in batched]
    # the anchored and prior rows really differ from the plain row of the same prompt
    assert abs(first[1].logprob - first[0].logprob) > 1e-3 or first[1].token_id != first[0].token_id
    assert dict(first[2].top) != dict(first[0].top)
    seqs = engine.bias
    assert seqs.resolve("anchored") == "anchored:default"


def test_unknown_or_malformed_corrections_are_rejected(loaded):
    params = SamplingParams(max_tokens=1)
    for spec, match in [("anchored:nope", "not loaded"), ("bogus", "must be 'anchored'")]:
        with pytest.raises(ValueError, match="bias_correction") as info:
            loaded.add_request(f"bad-{spec}", "Question: x?\nAnswer:", params, bias_correction=spec)
        assert match in str(info.value)
    assert not loaded.has_unfinished()


def test_anchored_and_lofit_change_the_kv_key(loaded):
    params = SamplingParams(max_tokens=1)
    loaded.add_request("k1", "hello", params, bias_correction="anchored", lofit="ad")
    loaded.add_request("k2", "hello", params, bias_correction="prior")
    keys = [loaded._requests[r][0].cache_key for r in ("k1", "k2")]
    assert keys == [("ad", "full", "anchored:default"), (None, "full", None)]
    while loaded.has_unfinished():
        loaded.step()


# -- calibration ---------------------------------------------------------------------------------


def test_calibration_is_deterministic_and_reduces_the_letter_bias(tiny_model_dir, tmp_path):
    engine = LLMEngine.from_config(EngineConfig(model=str(tiny_model_dir)))
    items = _word_items(6)
    config = CalibrationConfig(num_neurons=4, num_heads=3, iterations=6, prior_questions=6)
    a = calibrate(engine, items, config)
    b = calibrate(engine, items, config)
    assert torch.equal(a.head_offsets, b.head_offsets) and a.neurons == b.neurons
    assert torch.equal(a.prior, b.prior)
    history = a.calibration["mean_letter_probs"]  # one entry per correction pass
    assert len(history) == 7 and 1 <= len(a.heads) <= 3  # heads that push A up
    error = [max(abs(p - 0.25) for p in h) for h in history]
    assert error[-1] < 0.5 * error[0]
    save_profile(a, tmp_path / "p")
    engine.load_bias_profile("tiny", str(tmp_path / "p"))  # its base model is this model
    with pytest.raises(ValueError, match="calibrated for base model"):
        engine.load_bias_profile("x", str(_save(tmp_path / "q", _synthetic_profile())))


def _word_items(count: int) -> list[MCItem]:
    """`count` four-option questions over ten words, gold always the first option."""
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "rock"]
    return [
        MCItem(f"Which one is {words[i]}?", tuple(words[(i + j) % 10] for j in range(4)), 0)
        for i in range(count)
    ]


def test_calibration_grid_matches_calibrating_each_config_alone(tiny_model_dir):
    engine = LLMEngine.from_config(EngineConfig(model=str(tiny_model_dir)))
    items = _word_items(4)
    configs = [
        CalibrationConfig(num_neurons=n, num_heads=2, iterations=it, prior_questions=4)
        for n in (0, 3)
        for it in (1, 2)
    ]
    grid = calibrate_grid(engine, items, configs)  # one capture, two correction runs
    for config, profile in zip(configs, grid, strict=True):
        alone = calibrate(engine, items, config)
        assert profile.neurons == alone.neurons and profile.heads == alone.heads
        assert torch.equal(profile.head_offsets, alone.head_offsets)
        assert torch.equal(profile.prior, alone.prior)
        assert profile.calibration["config"] == alone.calibration["config"]
        assert profile.calibration["mean_letter_probs"] == alone.calibration["mean_letter_probs"]
    with pytest.raises(ValueError, match="same prior_questions"):
        calibrate_grid(engine, items, [CalibrationConfig(prior_questions=2), CalibrationConfig()])


def test_share_temperature_fits_the_sharpened_probabilities(tiny_model_dir):
    """T != 1 fits softmax(logits / T) instead: other offsets, and the mean sharpened
    probabilities approach 1/K; T = 1 is the default and records no sharpened history."""
    engine = LLMEngine.from_config(EngineConfig(model=str(tiny_model_dir)))
    items = _word_items(6)
    configs = [
        CalibrationConfig(
            num_neurons=0, num_heads=3, iterations=6, prior_questions=6, share_temperature=t
        )
        for t in (1.0, 0.25)
    ]
    plain, sharp = calibrate_grid(engine, items, configs)
    assert CalibrationConfig().share_temperature == 1.0
    assert "mean_sharpened_letter_probs" not in plain.calibration
    assert plain.calibration["config"]["share_temperature"] == 1.0
    assert sharp.calibration["config"]["share_temperature"] == 0.25
    assert plain.heads == sharp.heads
    assert not torch.allclose(plain.head_offsets, sharp.head_offsets)
    history = sharp.calibration["mean_sharpened_letter_probs"]
    assert len(history) == 7 and len(sharp.calibration["mean_letter_probs"]) == 7
    error = [max(abs(p - 0.25) for p in h) for h in history]
    assert error[-1] < 0.5 * error[0]
    with pytest.raises(ValueError, match="share_temperature must be positive"):
        calibrate(engine, items, CalibrationConfig(share_temperature=0.0))


def _save(path, profile):
    save_profile(profile, path)
    return path


HELD_OUT_CSV = (
    "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    "A,M,What do bees make?,Honey,Honey,Milk; Silk; Wool,x\n"
    "A,M,How many legs does a spider have?,Eight,Eight,Six; Four; Ten,x\n"
    "A,M,What is frozen water called?,Ice,Ice,Steam; Sand; Glass,x\n"
)


def test_committed_profile_moves_predictions_off_a(llm, tmp_path):
    """The committed profile on 3 questions written here, in all 4 rotations (model
    behaviour; the questions are not from ../shared so the test runs in any checkout)."""
    engine = llm.engine
    engine.load_bias_profile("committed", str(PROFILE))
    csv_path = tmp_path / "held_out.csv"
    csv_path.write_text(HELD_OUT_CSV)
    try:
        items = read_truthfulqa_csv(csv_path)[:12]
        plain = evaluate(engine, items)
        anchored = evaluate(engine, items, "anchored:committed")
        assert plain.shares["A"] >= 0.75
        assert anchored.shares["A"] <= 0.5
    finally:
        engine.bias.unregister("committed")


# -- through the server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bias_server(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("bias-server")
    save_profile(_synthetic_profile(), root / "default")
    with ServerProcess(
        "--bias-profile", f"default={root / 'default'}", "--max-model-len", "512"
    ) as proc:
        yield proc


def test_server_accepts_the_field_and_rejects_unknown_profiles(bias_server):
    client = openai.OpenAI(base_url=f"{bias_server.url}/v1", api_key="x", max_retries=0)
    prompt = format_prompt(QUESTIONS[0])

    def first(**extra):
        choice = client.completions.create(
            model=BASE,
            prompt=prompt,
            max_tokens=1,
            temperature=0,
            logprobs=5,
            extra_body=extra or None,
        ).choices[0]
        return choice.logprobs.top_logprobs[0]

    plain, anchored, prior = (
        first(),
        first(bias_correction="anchored"),
        first(bias_correction="prior"),
    )
    assert plain != anchored
    # the prior profile favours ' A' (0.4) over ' B' (0.1): its correction lowers A vs B
    if " A" in plain and " B" in plain and " A" in prior and " B" in prior:
        assert prior[" A"] - prior[" B"] < plain[" A"] - plain[" B"]
    else:
        assert prior != plain
    for spec in ("anchored:nope", "sideways"):
        with pytest.raises(openai.BadRequestError) as info:
            first(bias_correction=spec)
        err = info.value.response.json()["error"]
        assert info.value.status_code == 400 and err["param"] == "bias_correction"
        assert err["type"] == "invalid_request_error" and spec.split(":")[-1] in err["message"]
    chat = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=2,
        temperature=0,
        extra_body={"bias_correction": "anchored"},
    )
    assert chat.choices[0].finish_reason == "length"
    r = httpx.post(
        f"{bias_server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "bias_correction": "prior:x"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "bias_correction"
    assert first() == plain  # still serving, and unaffected


def test_cli_calibrate_then_eval(tiny_model_dir, tmp_path, capsys):
    from server.cli import main

    data = tmp_path / "items.jsonl"
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    data.write_text(
        "".join(
            json.dumps({"question": f"Which is {w}?", "options": [w, "x", "y", "z"], "answer": 0})
            + "\n"
            for w in words
        )
    )
    out = tmp_path / "profile"
    model = ["--model", str(tiny_model_dir)]
    calibrate_args = ["bias", "calibrate", "--data", str(data), "--out", str(out), *model]
    config = ["--heads", "3", "--neurons", "2", "--iterations", "2", "--share-temperature", "0.5"]
    assert main([*calibrate_args, *config]) == 0
    assert "wrote" in capsys.readouterr().out
    profile = load_profile(out)
    assert profile.calibration["questions"] == 6
    assert len(profile.heads) <= 3 and len(profile.neurons) <= 2
    recorded = profile.calibration["config"]
    assert recorded["share_temperature"] == 0.5 and recorded["iterations"] == 2
    assert main([*calibrate_args, "--share-temperature", "0"]) == 1
    assert "--share-temperature must be > 0" in capsys.readouterr().err
    assert main([*calibrate_args, "--max-questions", "4", "--prior-questions", "5"]) == 1
    assert "--prior-questions cannot exceed --max-questions" in capsys.readouterr().err
    args = ["eval", "mcq", "--data", str(data), "--correction", "prior", "--profile", str(out)]
    assert main([*args, *model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["correction"] == "prior" and report["n"] == 6
    assert abs(sum(report["shares"].values()) - 1) < 1e-6
    assert main(["eval", "mcq", "--data", str(data), "--correction", "anchored", *model]) == 1
    assert "needs --profile" in capsys.readouterr().err


def test_cli_calibrate_defaults_are_the_measured_configuration():
    """The README's plain `bias calibrate` reproduces the configuration benchmarks/README.md
    measured, not CalibrationConfig's library defaults."""
    from server.bias_cli import MEASURED_CALIBRATION
    from server.cli import build_parser

    args = build_parser().parse_args(["bias", "calibrate", "--data", "d.csv", "--out", "p"])
    assert {name: getattr(args, name) for name in MEASURED_CALIBRATION} == MEASURED_CALIBRATION
    args = build_parser().parse_args(
        ["bias", "calibrate", "--data", "d.csv", "--out", "p", "--heads", "5"]
    )
    assert args.heads == 5 and args.neurons == MEASURED_CALIBRATION["neurons"]


def test_token_batches_respect_the_budget_and_cover_every_prompt():
    from engine.mc_eval import token_batches

    prompts = [[1] * n for n in (3, 4, 9, 2, 2, 2)]
    assert list(token_batches(prompts, 8)) == [(0, 2), (2, 3), (3, 6)]
    assert list(token_batches([], 8)) == []
