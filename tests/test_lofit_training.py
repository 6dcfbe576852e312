"""LoFiT training: data converters, the two-stage trainer, and `longserve lofit train`.

The trainer runs on the tiny random model (fast); what it produces must load into the
serving engine and change that engine's output exactly as the training forward saw it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine.causal_attention import CausalTrainingAttention
from engine.forward_context import ForwardContext, SequenceSlice
from engine.llm_engine import EngineConfig, LLMEngine
from engine.lofit_adapter import load_adapter, save_adapter
from engine.lofit_data import (
    Example,
    clutrr_answer,
    convert_clutrr,
    convert_truthfulqa,
    load_jsonl,
    save_jsonl,
)
from engine.lofit_training import LofitTrainConfig, LofitTrainer
from engine.model_loader import load_model

# Rows in the layout of the CLUTRR and TruthfulQA files in ../shared/data (written here so
# the tests do not depend on a checkout beside this one).
CLUTRR_ROWS = [
    {
        "story": "[Ann] took her son [Bob] to the zoo. [Bob] brought his wife [Cia].",
        "clean_story": "[Ann] took her son [Bob] to the zoo. [Bob] brought his wife [Cia].",
        "query": "('Ann', 'Cia')",
        "target_text": "daughter-in-law",
    },
    {
        "story": "[Dan] and his sister [Eve] baked bread.",
        "query": "('Dan', 'Eve')",
        "target_text": "sister",
    },
]
TRUTHFULQA_CSV = (
    "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    'Adversarial,Misc,What colour is the sky?,It is blue,"Blue; It is blue",Green; Red,x\n'
    'Adversarial,Misc,"Is water wet, really?",Yes,Yes,No,x\n'
)

# A pattern the tiny random model can learn through per-head offsets alone.
MEMORISE = [Example(f"Colour number {i} is", " blue sky.") for i in range(8)]


@pytest.fixture
def clutrr_file(tmp_path):
    path = tmp_path / "clutrr.json"
    path.write_text(json.dumps(CLUTRR_ROWS))
    return path


def test_clutrr_converter_builds_lofit_prompts(clutrr_file):
    first, second = convert_clutrr(clutrr_file)
    assert first.prompt.startswith('Read the following story about a family. "Ann took')
    assert "how is Cia related to Ann? Answer: Cia is Ann 's\n" in first.prompt
    assert first.prompt.endswith("'s\n")
    assert "[" not in first.prompt and "]" not in first.prompt
    assert first.completion == "daughter-in-law."
    assert second.completion == "sister."  # falls back to `story` without `clean_story`
    clutrr_file.write_text(json.dumps([{"story": "x"}]))
    with pytest.raises(ValueError, match="row 0"):
        convert_clutrr(clutrr_file)


def test_clutrr_answer_stops_at_first_period_or_newline():
    assert clutrr_answer("daughter-in-law. And then") == "daughter-in-law"
    assert clutrr_answer(" son\nA: more") == "son"
    assert clutrr_answer("") == ""


def test_truthfulqa_converter(tmp_path):
    path = tmp_path / "tqa.csv"
    path.write_text(TRUTHFULQA_CSV)
    assert convert_truthfulqa(path) == [
        Example("Q: What colour is the sky? A:", " It is blue"),
        Example("Q: Is water wet, really? A:", " Yes"),
    ]


def test_jsonl_round_trip_and_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    save_jsonl(MEMORISE, path)
    assert load_jsonl(path) == MEMORISE
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_jsonl(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="not JSON"):
        load_jsonl(bad)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), torch.float32)


def _config(**overrides) -> LofitTrainConfig:
    base = dict(heads=4, epochs_a=2, epochs_v=8, lr_a=1e-2, lr_v=0.3, batch_size=4, dtype="float32")
    return LofitTrainConfig(**{**base, **overrides})


def _train(tiny, **overrides):
    trainer = LofitTrainer(tiny.model, tiny.tokenizer, tiny.name, _config(**overrides))
    trainer.progress = False
    return trainer.train(MEMORISE)


def test_training_lowers_the_loss_and_selects_top_heads(tiny):
    result = _train(tiny)
    assert len(result.adapter.heads) == 4
    best = sorted((layer, head) for layer, head, _ in result.head_ranking[:4])
    assert result.adapter.heads == best
    norms = [n for _, _, n in result.head_ranking]
    assert norms == sorted(norms, reverse=True)
    losses = result.losses["v"]
    # The tiny random model starts near 13 nats per token; offsets in 4 heads cut that.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 2.0
    assert torch.count_nonzero(result.adapter.A) == 0  # stage 2 keeps A at 0


def test_training_is_deterministic_under_a_seed(tiny):
    first = _train(tiny, epochs_v=2)
    second = _train(tiny, epochs_v=2)
    other = _train(tiny, epochs_v=2, seed=7)
    assert first.adapter.heads == second.adapter.heads
    assert torch.equal(first.adapter.v, second.adapter.v)
    assert not torch.equal(first.adapter.v, other.adapter.v)


def test_heads_as_fraction(tiny):
    c = tiny.config
    assert _config(heads=0.25).num_heads(c.num_layers * c.num_heads) == 2
    with pytest.raises(ValueError, match="heads"):
        _config(heads=2.5).validate()
    with pytest.raises(ValueError, match="heads"):
        _config(heads=0).validate()


def test_trained_adapter_serves_as_trained(tiny, tiny_model_dir, tmp_path):
    """The engine with the saved adapter gives the logits the training forward computed."""
    trainer = LofitTrainer(tiny.model, tiny.tokenizer, tiny.name, _config())
    trainer.progress = False
    result = trainer.train(MEMORISE)
    save_adapter(result.adapter, tmp_path / "adapter")

    prompt = tiny.tokenizer.encode(MEMORISE[0].prompt, add_special_tokens=True)
    ctx = ForwardContext(
        slices=[SequenceSlice(None, 0, len(prompt), 0)],
        backend=CausalTrainingAttention(),
        head_output_hooks=[trainer.vectors.hook],
    )
    with torch.no_grad():
        hidden = tiny.model(torch.tensor(prompt), torch.arange(len(prompt)), ctx)
        want = tiny.model.compute_logits(hidden[-1:])[0]

    engine = LLMEngine.from_config(EngineConfig(model=str(tiny_model_dir)))
    engine.load_lofit("memorise", str(tmp_path / "adapter"))
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=3, temperature=0, logprobs=5, ignore_eos=True)
    engine.add_request("r", prompt, params, lofit="memorise")
    engine.add_request("base", prompt, params)
    first_logprobs = {}
    while engine.has_unfinished():
        for delta in engine.step():
            first_logprobs.setdefault(delta.request_id, delta.logprobs[0])
    top = torch.log_softmax(want.float(), -1).topk(5)
    got, base = first_logprobs["r"], first_logprobs["base"]
    assert got.token_id == int(top.indices[0])
    assert abs(got.logprob - float(top.values[0])) < 1e-4
    assert abs(base.logprob - got.logprob) > 1e-2  # and the adapter did change the output


def test_cli_train_and_convert(tiny_model_dir, tmp_path, clutrr_file):
    data = tmp_path / "train.jsonl"
    save_jsonl(MEMORISE, data)
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "server.cli", "lofit", "train", "--data", str(data)]
    cmd += ["--out", str(out), "--model", str(tiny_model_dir), "--heads", "0.25"]
    cmd += ["--epochs-a", "1", "--epochs-v", "1", "--dtype", "float32", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["heads"] == 2 and summary["total_heads"] == 8
    adapter = load_adapter(out)
    assert len(adapter.heads) == 2 and adapter.base_model == tiny_model_dir.name
    assert "stage 2" in proc.stderr  # the progress bar

    converted = tmp_path / "clutrr.jsonl"
    cmd = [sys.executable, "-m", "server.cli", "lofit", "convert", "clutrr"]
    proc = subprocess.run(
        cmd + [str(clutrr_file), str(converted)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert len(load_jsonl(converted)) == 2

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "lofit",
            "train",
            "--data",
            str(converted),
            "--out",
            str(tmp_path / "x"),
            "--heads",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "heads" in bad.stderr and "Traceback" not in bad.stderr
