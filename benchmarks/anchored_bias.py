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

    .venv/bin/python benchmarks/anchored_bias.py --select [--out DIR]
    .venv/bin/python benchmarks/anchored_bias.py [--profile DIR] [--out DIR]
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
    base = CalibrationConfig(**{f: getattr(args, f) for f in CONFIG_FIELDS})
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
    parser.add_argument("--grid-neurons", type=_int_list, default=[0, 10])
    parser.add_argument("--grid-heads", type=_int_list, default=[10, 20])
    parser.add_argument("--grid-iterations", type=_int_list, default=[3, 4])
    parser.add_argument(
        "--grid-temperatures", type=_float_list, default=[1.0], help="share_temperature values"
    )
    parser.add_argument(
        "--select-json", default=str(ROOT / "benchmarks/results/anchored_bias_selection.json")
    )
    defaults = CalibrationConfig()
    for name in CONFIG_FIELDS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, type=type(getattr(defaults, name)), default=getattr(defaults, name)
        )
    args = parser.parse_args()
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
        config = CalibrationConfig(**{f: getattr(args, f) for f in CONFIG_FIELDS})
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

    val = read_truthfulqa_csv(args.val)
    rows = []
    for correction in ("none", "prior", "anchored"):
        start = time.monotonic()
        report = evaluate(engine, val, None if correction == "none" else correction, progress=True)
        rows.append((correction, report, time.monotonic() - start))
    texts = passages()
    ppl = {
        c: perplexity(engine, texts, None if c == "none" else c)
        for c in ("none", "prior", "anchored")
    }

    print()
    print(f"TruthfulQA val: {len(val) // 4} questions x 4 rotations, default model, fp32 CPU")
    print(format_table([(name, r) for name, r, _ in rows]))
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
        "val": {name: {**r.as_dict(), "seconds": round(s, 1)} for name, r, s in rows},
        "perplexity": {"passages": PASSAGE_MODULES, "chars": PASSAGE_CHARS, **ppl},
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
