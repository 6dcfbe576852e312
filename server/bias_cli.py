"""`longserve bias calibrate` and `longserve eval mcq`: make and check bias profiles."""

from __future__ import annotations

import argparse
import json
import time

from engine.mc_eval import MCReport

# The configuration measured in benchmarks/README.md (anchored_bias.py, round 3): chosen on
# held-out train questions in round 2, calibrated on the first 200 TruthfulQA train questions.
MEASURED_CALIBRATION = dict(
    max_questions=200, neurons=0, heads=20, iterations=6, share_temperature=0.25,
    prior_questions=200,
)  # fmt: skip


def add_bias_parsers(sub: argparse._SubParsersAction) -> None:
    bias = sub.add_parser("bias", help="anchored-bias profiles for multiple-choice prompts")
    bias_sub = bias.add_subparsers(dest="bias_command", required=True)
    cal = bias_sub.add_parser("calibrate", help="find the anchoring neurons and heads")
    cal.add_argument("--data", required=True, help="TruthfulQA .csv or JSONL of items")
    cal.add_argument("--out", required=True, help="profile directory to write")
    cal.add_argument("--model", default=None, help="model directory (default model)")
    cal.set_defaults(**MEASURED_CALIBRATION)
    cal.add_argument("--max-questions", type=int, help="use the first N questions")
    cal.add_argument("--num-options", type=int, default=4, help="options per TruthfulQA item")
    cal.add_argument("--seed", type=int, default=0, help="TruthfulQA option shuffle seed")
    cal.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    cal.add_argument("--neurons", type=int, help="MLP neurons")
    cal.add_argument("--heads", type=int, help="attention heads")
    cal.add_argument("--iterations", type=int, help="correction passes")
    cal.add_argument(
        "--share-temperature",
        type=float,
        help="T of the fit's softmax(letter logits / T); below 1 it targets prediction shares",
    )
    cal.add_argument(
        "--prior-questions",
        type=int,
        help="questions for the PriDe prior (the first N of the calibration set)",
    )

    ev = sub.add_parser("eval", help="evaluate the model on a task")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    mcq = ev_sub.add_parser("mcq", help="lettered multiple-choice accuracy and letter shares")
    mcq.add_argument("--data", required=True, help="TruthfulQA .csv or JSONL of items")
    mcq.add_argument("--correction", choices=["none", "anchored", "prior"], default="none")
    mcq.add_argument("--profile", default=None, help="bias profile directory (for a correction)")
    mcq.add_argument("--model", default=None, help="model directory (default model)")
    mcq.add_argument("--num-options", type=int, default=4, help="options per TruthfulQA item")
    mcq.add_argument("--seed", type=int, default=0, help="TruthfulQA option shuffle seed")
    mcq.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    mcq.add_argument("--json", action="store_true", help="print the report as JSON")


def _calibration_config(args: argparse.Namespace):
    """The CalibrationConfig the calibrate flags ask for; ValueError naming a bad flag."""
    from engine.bias_calibrate import CalibrationConfig

    for name in ("neurons", "heads", "prior_questions"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.max_questions < 1:
        raise ValueError("--max-questions must be >= 1")
    if args.prior_questions > args.max_questions:
        raise ValueError("--prior-questions cannot exceed --max-questions")
    if args.iterations < 1:
        raise ValueError("--iterations must be >= 1")
    if not args.share_temperature > 0:
        raise ValueError("--share-temperature must be > 0")
    return CalibrationConfig(
        max_questions=args.max_questions,
        num_neurons=args.neurons,
        num_heads=args.heads,
        iterations=args.iterations,
        share_temperature=args.share_temperature,
        prior_questions=args.prior_questions,
    )


def run_bias(args: argparse.Namespace) -> int:
    import torch

    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.mc_data import read_items

    config = _calibration_config(args) if args.command == "bias" else None  # before loading
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine.from_config(EngineConfig(model=args.model))
    items = read_items(args.data, args.num_options, args.seed)
    if config is not None:
        return _calibrate(args, config, engine, items)
    return _eval(args, engine, items)


def _calibrate(args, config, engine, items) -> int:
    from engine.bias_calibrate import calibrate
    from engine.bias_profile import save_profile

    start = time.monotonic()
    profile = calibrate(engine, items, config, progress=True)
    profile.calibration["data"] = str(args.data)
    save_profile(profile, args.out)
    cal = profile.calibration
    prior = [round(p, 3) for p in profile.prior.tolist()]
    print(
        f"wrote {args.out}: {len(profile.neurons)} neurons, {len(profile.heads)} heads, "
        f"prior {dict(zip(profile.letters, prior, strict=True))}; "
        f"calibration set A-share {cal['before']['shares']['A']:.3f} -> "
        f"{cal['after']['shares']['A']:.3f} in {time.monotonic() - start:.0f} s"
    )
    return 0


def _eval(args, engine, items) -> int:
    from engine.mc_eval import evaluate

    correction = None
    if args.correction != "none":
        if not args.profile:
            raise ValueError(f"--correction {args.correction} needs --profile DIR")
        engine.load_bias_profile("default", args.profile)
        correction = args.correction
    report = evaluate(engine, items, correction, progress=True)
    if args.json:
        print(json.dumps({"correction": args.correction, **report.as_dict()}, indent=1))
    else:
        print(format_table([(args.correction, report)]))
    return 0


def format_table(rows: list[tuple[str, MCReport]]) -> str:
    """A markdown table: correction, accuracy, anchored rate, RStd, letter shares, n."""
    letters = list(rows[0][1].shares)
    head = ["correction", "accuracy", "anchored rate", "RStd"] + [f"{c} share" for c in letters]
    lines = ["| " + " | ".join(head + ["n"]) + " |", "|" + "---|" * (len(head) + 1)]
    for name, r in rows:
        cells = [name, f"{r.accuracy:.3f}", f"{r.anchored_rate:.3f}", f"{r.rstd:.3f}"]
        cells += [f"{r.shares[c]:.3f}" for c in letters] + [str(r.n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
