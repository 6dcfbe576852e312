"""Anchored-bias correction on TruthfulQA lettered prompts: none vs prior vs anchored.

Calibrates a profile on train.csv (or loads one with --profile), evaluates the three
corrections on val.csv in one run (each question in all 4 rotations, so the gold letter
is spread exactly evenly) and measures what the correction costs on ordinary text: the
perplexity of 20 passages (the opening 700 characters of 20 Python stdlib module
docstrings) with and without the field.

With --select it chooses the configuration instead, without looking at val: it
calibrates a small grid of configurations (--grid-* flags, the fit's share temperature
included) on the first --max-questions train questions (one capture pass), evaluates
each on the next --select-questions train questions (held out from the calibration)
and keeps the one whose 'A' share is within 10 points of the
gold share with the highest accuracy, then the lowest RStd; that profile goes to --out.

With --eval-split train the three rows are scored on the train questions from --eval-from
(usable-question index, as in the calibration and selection slices; --eval-questions
limits the count) instead of val. A slice overlapping the questions the profile was made
from is refused: with --profile, the calibration and selection questions
0..(--max-questions + --select-questions - 1) and the profile's own calibration slice;
when this run calibrates, its calibration slice 0..(--max-questions - 1).

--max-questions and --prior-questions set the calibration slice (the profile's and the
PriDe prior's: the first N usable train questions); --num-neurons, --num-heads,
--iterations and --share-temperature fix the configuration. --no-perplexity skips the
perplexity table.

    .venv/bin/python benchmarks/anchored_bias.py --select [--out DIR]
    .venv/bin/python benchmarks/anchored_bias.py [--profile DIR] [--out DIR]
    .venv/bin/python benchmarks/anchored_bias.py --profile DIR --eval-split train --eval-from 118
    .venv/bin/python benchmarks/anchored_bias.py --max-questions 200 --prior-questions 200 \
        --num-neurons 0 --num-heads 20 --iterations 6 --share-temperature 0.25 \
        --out DIR --eval-split train --eval-from 200 --no-perplexity
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.bias_calibrate import CalibrationConfig, calibrate, calibrate_grid  # noqa: E402
from engine.bias_profile import save_profile  # noqa: E402
from engine.forward_context import ForwardContext, SequenceSlice  # noqa: E402
from engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from engine.mc_data import read_truthfulqa_csv  # noqa: E402
from engine.mc_eval import MCReport, evaluate  # noqa: E402
from server.bias_cli import format_table  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "truthfulqa"
PASSAGE_MODULES = (
    "argparse json re subprocess heapq statistics ftplib doctest pydoc inspect "
    "typing ast configparser copy hashlib io os pdb random shelve"
).split()
PASSAGE_CHARS = 700
CONFIG_FIELDS = (
    "max_questions",
    "num_neurons",
    "neuron_scale",
    "num_heads",
    "iterations",
    "share_temperature",
)
# set from flags as well, but not part of a selection row's recorded config
CALIBRATION_FLAGS = (*CONFIG_FIELDS, "prior_questions")
MAX_A_SHARE_GAP = 0.10  # selection: the 'A' share must be this close to the gold share


def passages() -> list[str]:
    """20 non-multiple-choice passages shipped with Python: module docstring openings."""
    return [importlib.import_module(m).__doc__.strip()[:PASSAGE_CHARS] for m in PASSAGE_MODULES]


@torch.inference_mode()
def perplexity(engine: LLMEngine, texts: list[str], correction: str | None) -> float:
    """Token-level perplexity of `texts`, each prefilled alone with `correction` applied
    exactly as for a request (activation hooks on every position, prior logit bias)."""
    model = engine.runner.model
    slot = 0 if correction is None else engine.bias.slot(correction)
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = engine.tokenizer.encode(text)
        cache = engine.router.new_cache("full")
        ctx = ForwardContext(slices=[SequenceSlice(cache, 0, len(ids), 0)], backend=engine.router)
        if slot:
            ctx.bias_slots = torch.full((len(ids),), slot, dtype=torch.long)
            head_hook, mlp_hook = engine.bias.hooks(ctx)
            ctx.head_output_hooks += [head_hook] if head_hook else []
            ctx.mlp_act_hooks += [mlp_hook] if mlp_hook else []
        try:
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), ctx)
        finally:
            engine.router.free(cache)
        logits = engine.bias.adjust_logits(model.compute_logits(hidden).float(), [slot] * len(ids))
        nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        total_nll += float(nll)
        total_tokens += len(ids) - 1
    return math.exp(total_nll / total_tokens)


def _config_name(c: CalibrationConfig) -> str:
    neurons = f"{c.num_neurons}x{c.neuron_scale:g}" if c.num_neurons else "0"
    return (
        f"anchored: neurons {neurons}, heads {c.num_heads}, passes {c.iterations}, "
        f"T {c.share_temperature:g}"
    )


def choose(reports: list[MCReport]) -> int:
    """Index of the chosen configuration: among those whose 'A' share is within
    MAX_A_SHARE_GAP of the gold 'A' share, the highest accuracy, then the lowest RStd
    (then the first); ValueError if none qualifies."""
    ok = [
        i
        for i, r in enumerate(reports)
        if abs(r.shares["A"] - r.gold_shares["A"]) <= MAX_A_SHARE_GAP + 1e-9
    ]
    if not ok:
        raise ValueError("no configuration brings the 'A' share within 10 points of gold")
    return min(ok, key=lambda i: (-reports[i].accuracy, reports[i].rstd))


def select(engine: LLMEngine, args: argparse.Namespace) -> None:
    """Calibrate the grid on train questions [0, n), evaluate it on the held-out train
    questions [n, n + m) (all rotations), print the table and save the chosen profile."""
    train = read_truthfulqa_csv(args.train, rotate=False)
    n, m = args.max_questions, args.select_questions
    cal, held = train[:n], train[n : n + m]
    if len(held) < m:
        raise SystemExit(f"{args.train} has {len(train)} usable questions, {n + m} needed")
    assert not {q.question for q in cal} & {q.question for q in held}
    held_items = [r for q in held for r in q.rotations()]
    base = CalibrationConfig(**{f: getattr(args, f) for f in CALIBRATION_FLAGS})
    grid = [
        replace(
            base, num_neurons=neurons, num_heads=heads, iterations=passes, share_temperature=temp
        )
        for neurons in args.grid_neurons
        for heads in args.grid_heads
        for temp in args.grid_temperatures
        for passes in args.grid_iterations
    ]
    start = time.monotonic()
    profiles = calibrate_grid(engine, cal, grid, progress=True)
    calibration_s = time.monotonic() - start
    print(f"calibrated {len(grid)} configurations on {n} train questions in {calibration_s:.0f} s")

    rows = []  # (name, config, report, seconds)
    for name, config, profile, correction in [
        ("none", None, profiles[0], None),
        ("prior", None, profiles[0], "prior:select"),  # one capture: one prior for all
        *[(_config_name(c), c, p, "anchored:select") for c, p in zip(grid, profiles, strict=True)],
    ]:
        engine.bias.register("select", profile)
        try:
            t = time.monotonic()
            report = evaluate(engine, held_items, correction, progress=True)
            rows.append((name, config, report, time.monotonic() - t))
        finally:
            engine.bias.unregister("select")
    chosen = 2 + choose([r for _, c, r, _ in rows[2:]])
    chosen_profile = profiles[chosen - 2]
    chosen_profile.calibration["data"] = "truthfulqa/train.csv"
    save_profile(chosen_profile, args.out)

    print()
    print(
        f"Selection on held-out TruthfulQA train questions {n}..{n + m - 1} "
        f"({len(held_items)} prompts; calibration: train questions 0..{n - 1})"
    )
    print(format_table([(name, r) for name, _, r, _ in rows]))
    print(f"\nchosen: {rows[chosen][0]} -> {args.out}")
    result = {
        "model": engine.model_name,
        "python": platform.python_version(),
        "calibration": {"data": "truthfulqa/train.csv", "questions": [0, n - 1]},
        "calibration_seconds": round(calibration_s, 1),
        "held_out": {"data": "truthfulqa/train.csv", "questions": [n, n + m - 1]},
        "criterion": "A share within 10 points of the gold share, then accuracy, then RStd",
        "rows": [
            {
                "name": name,
                "config": None if c is None else {f: getattr(c, f) for f in CONFIG_FIELDS},
                **r.as_dict(),
                "seconds": round(s, 1),
            }
            for name, c, r, s in rows
        ],
        "chosen": rows[chosen][0],
    }
    Path(args.select_json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.select_json}")


def train_holdout(args: argparse.Namespace) -> tuple[list, int, int]:
    """The rotated prompts of train questions [--eval-from, --eval-from + --eval-questions)
    and the slice's first and last usable-question index; SystemExit if the slice is empty
    or overlaps the questions the profile comes from: with --profile, the calibration and
    selection questions [0, max_questions + select_questions) (the profile's own
    calibration slice is checked once it is loaded); when this run calibrates, its
    calibration questions [0, max_questions)."""
    if args.profile:
        reserved = args.max_questions + args.select_questions
        used = (
            f"calibration (0..{args.max_questions - 1}) and selection "
            f"({args.max_questions}..{reserved - 1})"
        )
    else:
        reserved = args.max_questions
        used = "this run's calibration"
    start = reserved if args.eval_from is None else args.eval_from
    if start < reserved:
        raise SystemExit(
            f"--eval-from {start} overlaps train questions 0..{reserved - 1}, used for "
            f"{used}; use --eval-from {reserved} or more"
        )
    train = read_truthfulqa_csv(args.train, rotate=False)
    stop = len(train) if args.eval_questions is None else start + args.eval_questions
    held = train[start:stop]
    if not held or len(held) < stop - start:
        raise SystemExit(
            f"{args.train} has {len(train)} usable questions; "
            f"{start}..{max(stop, start + 1) - 1} requested"
        )
    assert not {q.question for q in train[:reserved]} & {q.question for q in held}
    return [r for q in held for r in q.rotations()], start, start + len(held) - 1


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default=str(DATA / "train.csv"))
    parser.add_argument("--val", default=str(DATA / "val.csv"))
    parser.add_argument("--profile", default=None, help="use this profile, do not calibrate")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/anchored_bias_profile"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/anchored_bias.json"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--select", action="store_true", help="choose the config on train")
    parser.add_argument("--select-questions", type=int, default=70)
    parser.add_argument(
        "--eval-split", choices=("val", "train"), default="val", help="where the rows are scored"
    )
    parser.add_argument(
        "--eval-from",
        type=int,
        default=None,
        help="with --eval-split train: first usable train question (default: first after "
        "the calibration and selection slices)",
    )
    parser.add_argument(
        "--eval-questions", type=int, default=None, help="with --eval-split train: how many"
    )
    parser.add_argument("--grid-neurons", type=_int_list, default=[0, 10])
    parser.add_argument("--grid-heads", type=_int_list, default=[10, 20])
    parser.add_argument("--grid-iterations", type=_int_list, default=[3, 4])
    parser.add_argument(
        "--grid-temperatures", type=_float_list, default=[1.0], help="share_temperature values"
    )
    parser.add_argument(
        "--select-json", default=str(ROOT / "benchmarks/results/anchored_bias_selection.json")
    )
    parser.add_argument(
        "--no-perplexity", action="store_true", help="skip the perplexity of ordinary text"
    )
    defaults = CalibrationConfig()
    for name in CALIBRATION_FLAGS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, type=type(getattr(defaults, name)), default=getattr(defaults, name)
        )
    args = parser.parse_args()
    if args.prior_questions > args.max_questions:
        parser.error("--prior-questions cannot exceed --max-questions (the prior's questions)")
    if args.eval_split == "train":
        if args.select:
            parser.error("--eval-split train scores a fixed profile; it does not go with --select")
        eval_items, eval_first, eval_last = train_holdout(args)  # refuses before loading
    elif args.eval_from is not None or args.eval_questions is not None:
        parser.error("--eval-from / --eval-questions need --eval-split train")
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = LLMEngine.from_config(EngineConfig())
    if args.select:
        select(engine, args)
        return
    calibration_s = None
    if args.profile:
        profile_dir = args.profile
    else:
        start = time.monotonic()
        train = read_truthfulqa_csv(args.train, rotate=False)
        config = CalibrationConfig(**{f: getattr(args, f) for f in CALIBRATION_FLAGS})
        profile = calibrate(engine, train, config, progress=True)
        profile.calibration["data"] = "truthfulqa/train.csv"
        calibration_s = time.monotonic() - start
        save_profile(profile, args.out)
        profile_dir = args.out
        print(
            f"calibrated on {profile.calibration['questions']} train questions "
            f"({profile.calibration['prompts']} prompts) in {calibration_s:.0f} s -> {args.out}"
        )
    engine.load_bias_profile("default", profile_dir)
    calibrated = engine.bias.profiles["default"].calibration.get("questions") or 0
    if args.eval_split == "train" and calibrated > eval_first:
        raise SystemExit(f"the profile was calibrated on train questions 0..{calibrated - 1}")

    if args.eval_split == "train":
        val = eval_items
        held = (
            "held out, never used before"
            if args.profile
            else f"held out from the calibration on train questions 0..{calibrated - 1}"
        )
        title = (
            f"TruthfulQA train questions {eval_first}..{eval_last} ({held}): "
            f"{len(val) // 4} questions x 4 rotations, default model, fp32 CPU"
        )
    else:
        val = read_truthfulqa_csv(args.val)
        title = f"TruthfulQA val: {len(val) // 4} questions x 4 rotations, default model, fp32 CPU"
    rows = []
    for correction in ("none", "prior", "anchored"):
        start = time.monotonic()
        report = evaluate(engine, val, None if correction == "none" else correction, progress=True)
        rows.append((correction, report, time.monotonic() - start))
    ppl = None
    if not args.no_perplexity:
        texts = passages()
        ppl = {
            c: perplexity(engine, texts, None if c == "none" else c)
            for c in ("none", "prior", "anchored")
        }

    print()
    print(title)
    print(format_table([(name, r) for name, r, _ in rows]))
    if ppl is not None:
        print()
        print("| correction | perplexity (20 stdlib docstring passages) | ratio to none |")
        print("|---|---|---|")
        for c, p in ppl.items():
            print(f"| {c} | {p:.3f} | {p / ppl['none']:.4f} |")
    result = {
        "model": engine.model_name,
        "python": platform.python_version(),
        "profile": str(Path(profile_dir).relative_to(ROOT))
        if Path(profile_dir).is_relative_to(ROOT)
        else profile_dir,
        "calibration_seconds": None if calibration_s is None else round(calibration_s, 1),
        "calibration": {
            k: engine.bias.profiles["default"].calibration.get(k)
            for k in ("data", "questions", "prompts", "config")
        },
        **(
            {"eval": {"data": "truthfulqa/train.csv", "questions": [eval_first, eval_last]}}
            if args.eval_split == "train"
            else {}
        ),
        ("val" if args.eval_split == "val" else "train_holdout"): {
            name: {**r.as_dict(), "seconds": round(s, 1)} for name, r, s in rows
        },
        "perplexity": None
        if ppl is None
        else {"passages": PASSAGE_MODULES, "chars": PASSAGE_CHARS, **ppl},
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
