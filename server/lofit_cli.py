"""`longserve lofit train` and `longserve lofit convert`: make LoFiT adapters from data."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger("longserve")


def add_lofit_parser(sub: argparse._SubParsersAction) -> None:
    lofit = sub.add_parser("lofit", help="train LoFiT adapters")
    lofit_sub = lofit.add_subparsers(dest="lofit_command", required=True)

    train = lofit_sub.add_parser("train", help="train an adapter (two stages, as in LoFiT)")
    train.add_argument("--data", required=True, help='JSONL of {"prompt", "completion"}')
    train.add_argument("--out", required=True, help="adapter directory to write")
    train.add_argument("--model", default=None, help="base model directory (default model)")
    train.add_argument(
        "--heads", type=float, default=0.1, help="heads to tune: a count (>= 1) or a fraction"
    )
    train.add_argument("--max-examples", type=int, default=None, help="use the first N rows")
    train.add_argument("--epochs-a", type=float, default=1.0, help="stage 1 passes over the data")
    train.add_argument("--epochs-v", type=float, default=2.0, help="stage 2 passes over the data")
    train.add_argument("--lr-a", type=float, default=5e-3)
    train.add_argument("--lr-v", type=float, default=1e-2)
    train.add_argument("--l1", type=float, default=1e-3, help="L1 weight on A in stage 1")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--dtype", default="bfloat16", help="frozen model dtype while training")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument("--log-level", default="info")

    convert = lofit_sub.add_parser("convert", help="convert CLUTRR/TruthfulQA files to JSONL")
    convert.add_argument("format", choices=["clutrr", "truthfulqa"])
    convert.add_argument("input", help="clutrr/*.json or truthfulqa/*.csv")
    convert.add_argument("output", help="JSONL file to write")


def run_lofit(args: argparse.Namespace) -> int:
    if args.lofit_command == "convert":
        return _convert(args)
    return _train(args)


def _convert(args: argparse.Namespace) -> int:
    from engine.lofit_data import CONVERTERS, save_jsonl

    examples = CONVERTERS[args.format](args.input)
    save_jsonl(examples, args.output)
    print(f"wrote {len(examples)} examples to {args.output}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from engine.lofit_adapter import save_adapter
    from engine.lofit_data import load_jsonl
    from engine.lofit_training import LofitTrainConfig, LofitTrainer, training_dtype
    from engine.model_loader import load_model

    config = LofitTrainConfig(
        heads=args.heads,
        epochs_a=args.epochs_a,
        epochs_v=args.epochs_v,
        lr_a=args.lr_a,
        lr_v=args.lr_v,
        l1_a=args.l1,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
    )
    config.validate()
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError("--max-examples must be >= 1")
    examples = load_jsonl(args.data)[: args.max_examples]
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, training_dtype(config.dtype))
    trainer = LofitTrainer(loaded.model, loaded.tokenizer, loaded.name, config)
    result = trainer.train(examples)
    out = Path(args.out)
    save_adapter(result.adapter, out)
    summary = {
        "examples": len(examples),
        "heads": len(result.adapter.heads),
        "total_heads": loaded.config.num_layers * loaded.config.num_heads,
        "final_loss": {stage: losses[-1] for stage, losses in result.losses.items()},
        "seconds": result.seconds,
        "config": vars(config),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("Wrote %s (%d heads)", out, len(result.adapter.heads))
    print(json.dumps(summary))
    return 0
