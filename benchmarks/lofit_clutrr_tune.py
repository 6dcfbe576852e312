"""Choose LoFiT's stage-2 learning rate for CLUTRR on a held-out split of *train*.

Val is never read. The last `--dev` examples of the shuffled train set (same shuffle as
`lofit_clutrr.py`) are held out; stage 1 runs once on the first `--train-a`, then stage 2
runs on the first `--train-v` for each learning rate, and each adapter is scored (exact
match, greedy, 16 tokens) on the held-out examples. Usage:

    .venv/bin/python benchmarks/lofit_clutrr_tune.py [--lrs 1e-2,3e-2] [--train-v 400]
        [--dev 200] [--num-threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from lofit_clutrr import DATA, exact_match  # this directory is on sys.path

from engine.llm import LLM
from engine.lofit_adapter import LofitAdapter, save_adapter
from engine.lofit_data import convert_clutrr
from engine.lofit_training import LofitTrainConfig, LofitTrainer, training_dtype
from engine.model_loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA, help="directory with train.json")
    parser.add_argument("--lrs", default="1e-2,3e-2", help="stage-2 learning rates to compare")
    parser.add_argument("--train-a", type=int, default=320, help="examples for stage 1 (A)")
    parser.add_argument("--train-v", type=int, default=400, help="examples for stage 2 (v)")
    parser.add_argument("--dev", type=int, default=200, help="train examples held out")
    parser.add_argument("--lr-a", type=float, default=5e-3)
    parser.add_argument("--l1", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the scores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    lrs = [float(x) for x in args.lrs.split(",")]

    train = convert_clutrr(args.data / "train.json")
    random.Random(args.seed).shuffle(train)
    if not 0 < args.dev < len(train) - max(args.train_a, args.train_v):
        raise ValueError("--dev must leave --train-a and --train-v examples to train on")
    dev, pool = train[-args.dev :], train[: -args.dev]

    # Stage 1 once (stage 2 cut to one step); the stage-2 runs below share its heads.
    config = LofitTrainConfig(
        heads=0.1, epochs_a=1.0, epochs_v=1e-9, lr_a=args.lr_a, l1_a=args.l1, seed=args.seed
    )
    loaded = load_model(None, training_dtype(config.dtype))
    trainer = LofitTrainer(loaded.model, loaded.tokenizer, loaded.name, config)
    heads = trainer.train_stages(pool[: args.train_a], pool[:8]).adapter.heads
    data_v = trainer.tokenize(pool[: args.train_v])
    vec = trainer.vectors
    tmp = Path(tempfile.mkdtemp(prefix="lofit_tune_"))
    for lr in lrs:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            vec.A.zero_()
            vec.v.normal_(0, config.init_std)
            vec.v_mask.zero_()
            for layer, head in heads:
                vec.v_mask[layer, head] = 1
        start = time.monotonic()
        trainer.run_stage(data_v, random.Random(7), vec.v, lr, 1.0, 0.0, f"v lr={lr}")
        logging.info("stage 2 at lr %g took %.0f s", lr, time.monotonic() - start)
        v = vec.v.detach()
        adapter = LofitAdapter(
            base_model=loaded.name,
            heads=heads,
            A=torch.zeros(len(heads), v.shape[-1]),
            v=torch.stack([v[layer, head] for layer, head in heads]),
        )
        save_adapter(adapter, tmp / f"lr_{lr}")
    del loaded, trainer

    llm = LLM(None)
    golds = [ex.completion.rstrip(".") for ex in dev]
    prompts = [ex.prompt for ex in dev]
    scores = {}
    for i, lr in enumerate(lrs):
        llm.engine.load_lofit(f"lr{i}", str(tmp / f"lr_{lr}"))
        scores[lr], _ = exact_match(llm, prompts, golds, f"lr{i}")
    shutil.rmtree(tmp)
    print(f"\nCLUTRR held-out train split, {len(dev)} examples, exact match")
    for lr, em in scores.items():
        print(f"  lr_v={lr:<8g} {em:6.1%}")
    if args.out:
        args.out.write_text(json.dumps({str(k): v for k, v in scores.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
