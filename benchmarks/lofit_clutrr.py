"""LoFiT on CLUTRR: train an adapter on a slice of train, compare exact match on val.

Prints, in one run: the base model, the most-frequent-relation baseline and the trained
adapter (greedy, 16 new tokens, answer = text up to the first period), with the share of
heads the adapter uses. Usage:

    .venv/bin/python benchmarks/lofit_clutrr.py [--train-a 320] [--train-v 0] [--val 450]
        [--num-threads 1]

`--train-v 0` (the default) uses all of train for stage 2. The stage-2 rate `--lr-v` was chosen
on a held-out split of train, never on val (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import time
from pathlib import Path

import torch

from engine.llm import LLM
from engine.lofit_adapter import save_adapter
from engine.lofit_data import clutrr_answer, convert_clutrr
from engine.lofit_training import LofitTrainConfig, LofitTrainer, training_dtype
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clutrr"


def exact_match(
    llm: LLM, prompts: list[str], golds: list[str], lofit: str | None
) -> tuple[float, list[str]]:
    params = SamplingParams(max_tokens=16, temperature=0)
    outputs = llm.generate(prompts, params, use_tqdm=True, lofit=lofit)
    answers = [clutrr_answer(o.outputs[0].text) for o in outputs]
    return sum(a == g for a, g in zip(answers, golds, strict=True)) / len(golds), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA, help="directory with train/val.json")
    parser.add_argument("--train-a", type=int, default=320, help="examples for stage 1 (A)")
    parser.add_argument(
        "--train-v", type=int, default=0, help="examples for stage 2 (v); 0: all of train"
    )
    parser.add_argument("--epochs-v", type=float, default=1.0)
    parser.add_argument("--heads", type=float, default=0.1)
    parser.add_argument("--lr-a", type=float, default=5e-3)
    parser.add_argument("--lr-v", type=float, default=3e-2)
    parser.add_argument("--l1", type=float, default=1e-3)
    parser.add_argument("--val", type=int, default=450, help="val examples to score (all: 450)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lofit_clutrr"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    train = convert_clutrr(args.data / "train.json")
    random.Random(args.seed).shuffle(train)
    n_a = min(args.train_a, len(train))
    n_v = min(args.train_v, len(train)) if args.train_v > 0 else len(train)
    val = convert_clutrr(args.data / "val.json")[: args.val]
    golds = [ex.completion.rstrip(".") for ex in val]
    prompts = [ex.prompt for ex in val]

    config = LofitTrainConfig(
        heads=args.heads,
        epochs_a=1.0,
        epochs_v=args.epochs_v,
        lr_a=args.lr_a,
        lr_v=args.lr_v,
        l1_a=args.l1,
        seed=args.seed,
    )
    loaded = load_model(None, training_dtype(config.dtype))
    trainer = LofitTrainer(loaded.model, loaded.tokenizer, loaded.name, config)
    # Stage 1 ranks heads on the first slice; stage 2 tunes offsets on a larger one.
    start = time.monotonic()
    result = trainer.train_stages(train[:n_a], train[:n_v])
    train_seconds = time.monotonic() - start
    adapter_dir = args.out / "adapter"
    save_adapter(result.adapter, adapter_dir)
    del loaded, trainer

    llm = LLM(None)
    llm.engine.load_lofit("clutrr", str(adapter_dir))
    base_em, base_answers = exact_match(llm, prompts, golds, None)
    lofit_em, lofit_answers = exact_match(llm, prompts, golds, "clutrr")
    train_golds = collections.Counter(ex.completion.rstrip(".") for ex in train)
    majority = train_golds.most_common(1)[0][0]
    majority_em = sum(g == majority for g in golds) / len(golds)

    total_heads = llm.engine.model_config.num_layers * llm.engine.model_config.num_heads
    n_heads = len(result.adapter.heads)
    rows = [
        ("base model", base_em),
        (f"most frequent relation ({majority!r})", majority_em),
        (f"LoFiT adapter ({n_heads}/{total_heads} heads = {n_heads / total_heads:.1%})", lofit_em),
    ]
    print(f"\nCLUTRR val, {len(golds)} examples, exact match (greedy, 16 tokens)")
    for name, em in rows:
        print(f"  {name:<55} {em:6.1%}")
    print(
        f"training: stage 1 on {n_a} examples, stage 2 on "
        f"{n_v} x {args.epochs_v} epochs, {train_seconds:.0f} s "
        f"(threads={torch.get_num_threads()})"
    )
    summary = {
        "val_examples": len(golds),
        "exact_match": {"base": base_em, "majority": majority_em, "lofit": lofit_em},
        "heads": n_heads,
        "total_heads": total_heads,
        "train_examples": {"A": n_a, "v": n_v},
        "train_seconds": train_seconds,
        "threads": torch.get_num_threads(),
        "stage_seconds": result.seconds,
        "final_loss": {stage: losses[-1] for stage, losses in result.losses.items()},
        "config": vars(config),
        "sample_answers": [
            {"gold": g, "base": b, "lofit": a}
            for g, b, a in list(zip(golds, base_answers, lofit_answers, strict=True))[:10]
        ],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
