"""Document cache: TTFT of 5 questions about one 8000-token document, cache on vs off.

The document is real text that ships with Python: sections of the language reference
(`pydoc_data.topics`: for, while, if, try, with, function, class, raise, ...) cut to
exactly `--doc-tokens` tokens. Each question is a chat turn "document + question", sent
one after another (each runs alone) through the engine, first with the prefix cache
on, then off, in each attention mode. Printed per request: TTFT, end-to-end time and
whether the greedy answer equals the cache-off answer; per mode: mean TTFT of requests
2-5 over request 1 (goal <= 0.1). Writes `results/prefix_cache.json`.

    .venv/bin/python benchmarks/prefix_cache.py            # full + retrieval (attention-aware)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.model_files import resolve_model_dir
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer, render_chat

TOPICS = [
    "for", "while", "if", "try", "with", "function", "class", "raise", "return", "import",
    "assert", "pass", "break", "continue", "del", "global", "nonlocal",
]  # fmt: skip
QUESTIONS = [
    "What does the else clause of a for loop do?",
    "When does the finally clause of a try statement run?",
    "Which method does the with statement call when its block is left?",
    "What does a bare raise statement (with no expression) do?",
    "What does a return statement do inside a generator function?",
]
PLACEHOLDER = "\x00DOC\x00"


def document_tokens(tokenizer, num_tokens: int) -> list[int]:
    """Language-reference sections, concatenated and cut to `num_tokens` tokens."""
    from pydoc_data.topics import topics

    text = "\n\n".join(f"## {name}\n\n{topics[name].strip()}" for name in TOPICS)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < num_tokens:
        raise SystemExit(f"the document has only {len(ids)} tokens; ask for fewer")
    return ids[:num_tokens]


def prompts(tokenizer, doc: list[int]) -> list[list[int]]:
    """Chat prompts "Read the document ... <doc> ... Question: q", as token ids."""
    out = []
    for question in QUESTIONS:
        content = f"Read this document.\n\n{PLACEHOLDER}\n\nQuestion: {question} Answer briefly."
        before, after = render_chat(tokenizer, [{"role": "user", "content": content}]).split(
            PLACEHOLDER
        )
        enc = tokenizer.encode
        out.append(
            enc(before, add_special_tokens=False) + doc + enc(after, add_special_tokens=False)
        )
    return out


def ask(engine: LLMEngine, rid: str, prompt: list[int], max_tokens: int) -> dict:
    """Run one request alone; TTFT and end-to-end seconds, the answer's tokens and text."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.monotonic()
    engine.add_request(rid, prompt, params)
    first, tokens, text = None, [], ""
    while engine.has_unfinished():
        for out in engine.step():
            if first is None:
                first = time.monotonic()
            tokens += out.token_ids
            text += out.text
    return {
        "ttft_s": first - start,
        "e2e_s": time.monotonic() - start,
        "tokens": tokens,
        "text": text,
    }


def run_mode(args, mode: str, cache: bool, requests: list[list[int]]) -> dict:
    engine = LLMEngine.from_config(
        EngineConfig(
            model=args.model,
            attention=mode,
            index=args.index,
            prefix_cache_bytes=args.prefix_cache_bytes if cache else 0,
            num_threads=args.num_threads,
        )
    )
    answers = [
        ask(engine, f"{mode}-{cache}-{i}", p, args.max_tokens) for i, p in enumerate(requests)
    ]
    result = {"answers": answers, "prefix_cache": engine.prefix_cache.stats()}
    del engine
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2)")
    parser.add_argument("--modes", nargs="+", default=["full", "retrieval"])
    parser.add_argument("--index", default="attention-aware", help="retrieval mode's index")
    parser.add_argument("--doc-tokens", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prefix-cache-bytes", type=int, default=2 << 30)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/prefix_cache.json"))
    args = parser.parse_args()

    tokenizer = load_tokenizer(resolve_model_dir(args.model))
    doc = document_tokens(tokenizer, args.doc_tokens)
    requests = prompts(tokenizer, doc)
    load_before = os.getloadavg()
    started = time.time()
    rows, summary = [], {}
    for mode in args.modes:
        on = run_mode(args, mode, True, requests)
        off = run_mode(args, mode, False, requests)
        ttft1 = on["answers"][0]["ttft_s"]
        for i, (a, b) in enumerate(zip(on["answers"], off["answers"], strict=True)):
            rows.append(
                {
                    "mode": mode,
                    "request": i + 1,
                    "prompt_tokens": len(requests[i]),
                    "ttft_on_s": a["ttft_s"],
                    "ttft_off_s": b["ttft_s"],
                    "ttft_vs_request_1": a["ttft_s"] / ttft1,
                    "e2e_on_s": a["e2e_s"],
                    "e2e_off_s": b["e2e_s"],
                    "same_answer": a["tokens"] == b["tokens"],
                    "answer": a["text"],
                    "answer_off": b["text"],
                }
            )
        later = [a["ttft_s"] for a in on["answers"][1:]]
        summary[mode] = {
            "ttft_request_1_s": ttft1,
            "mean_ttft_requests_2_5_s": sum(later) / len(later),
            "ratio": sum(later) / len(later) / ttft1,
            "max_ratio": max(later) / ttft1,
            "all_answers_same": all(r["same_answer"] for r in rows if r["mode"] == mode),
            "prefix_cache": on["prefix_cache"],
        }

    print(f"\ndocument: {args.doc_tokens} tokens of Python's language reference (pydoc_data)")
    print("| mode | request | prompt tokens | TTFT on (s) | TTFT / request 1 | TTFT off (s) "
          "| e2e on (s) | e2e off (s) | same answer |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['request']} | {r['prompt_tokens']} | {r['ttft_on_s']:.2f} "
            f"| {r['ttft_vs_request_1']:.3f} | {r['ttft_off_s']:.2f} | {r['e2e_on_s']:.2f} "
            f"| {r['e2e_off_s']:.2f} | {'yes' if r['same_answer'] else 'NO'} |"
        )
    print("\n| mode | TTFT request 1 (s) | mean TTFT 2-5 (s) | ratio (goal <= 0.1) | all same |")
    print("|---|---:|---:|---:|---|")
    for mode, s in summary.items():
        print(
            f"| {mode} | {s['ttft_request_1_s']:.2f} | {s['mean_ttft_requests_2_5_s']:.3f} "
            f"| {s['ratio']:.3f} | {'yes' if s['all_answers_same'] else 'NO'} |"
        )
    for r in rows:
        print(f"{r['mode']} {r['request']}: {QUESTIONS[r['request'] - 1]!r} -> {r['answer']!r}")
    conditions = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_s": time.time() - started,
        "args": vars(args),
    }
    print(f"\nconditions: {conditions}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"conditions": conditions, "summary": summary, "rows": rows}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
