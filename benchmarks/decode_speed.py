"""Prefill and decode speed: longserve's engine vs transformers' `generate`, same weights.

Measured in one run on this machine, so the ratios are meaningful even when absolute
timings are noisy. Usage:

    .venv/bin/python benchmarks/decode_speed.py [--contexts 512 2048] [--decode-tokens 64]
        [--threads N] [--variants float32 float32-dense bfloat16 bfloat16-dense]

A variant is a dtype; `-dense` turns off decoding from the GGUF's quantisation blocks
(`--no-block-weights`), which float32 and bfloat16 use for few-row products.

transformers runs in a child process (`--hf-worker`) so that each side runs under its
own OpenMP default: ours with passive workers as the server sets them, transformers with
libgomp's (spin, then sleep). `--hf-env same` gives the child our settings instead.
The two sides still alternate, one measurement each, so drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

# As the server does (engine/__init__.py), before torch loads OpenMP; not in the
# transformers worker, which gets the environment its parent chose.
USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
if "--hf-worker" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from child_worker import ChildWorker  # noqa: E402


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


def ours_single(engine: LLMEngine, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per token) for one sequence."""
    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    engine.add_request("bench", prompt, params)
    start = time.perf_counter()
    first = None
    while engine.has_unfinished():
        if engine.step() and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (end - first) / decode_tokens


def ours_batched(engine: LLMEngine, prompts: list[list[int]], decode_tokens: int) -> float:
    """Decode tokens/s over the steps in which every sequence of the batch decodes."""
    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"batch-{i}", p, params)
    produced, elapsed = 0, 0.0
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        step_time = time.perf_counter() - start
        # every sequence decoded (none produced its first token, i.e. finished a prefill)
        if len(outputs) == len(prompts) and min(o.num_output_tokens for o in outputs) > 1:
            produced += len(outputs)
            elapsed += step_time
    return produced / elapsed


def hf_single(model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    n = decode_tokens + 1
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
    total = time.perf_counter() - start
    return prefill, (total - prefill) / decode_tokens


class HFProcess(ChildWorker):
    """transformers' model in a child process, timed on request (`hf_single` there)."""

    def __init__(self, dtype: str, threads: int | None, same_env: bool) -> None:
        cmd = [sys.executable, __file__, "--hf-worker", dtype]
        if threads:
            cmd += ["--threads", str(threads)]
        super().__init__(cmd, USER_WAIT_POLICY, same_env)

    def single(self, context: int, seed: int, decode_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds per token) of random_prompt(context, seed)."""
        prefill, decode = self.ask(f"{context} {seed} {decode_tokens}")
        return prefill, decode


def hf_worker(dtype: str) -> None:
    """Answer `context seed decode_tokens` lines on stdin with JSON timings on stdout."""
    from transformers import AutoModelForCausalLM

    from engine.model_files import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(
        default_model_dir(), dtype=getattr(torch, dtype)
    ).eval()
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for line in sys.stdin:
            context, seed, decode_tokens = map(int, line.split())
            timings = hf_single(model, random_prompt(context, vocab, seed), decode_tokens)
            print(json.dumps(timings), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--variants", nargs="+", default=["float32", "float32-dense", "bfloat16"])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both sides")
    parser.add_argument(
        "--hf-env",
        choices=["default", "same"],
        default="default",
        help="transformers' OpenMP wait policy: its own default, or the same as ours",
    )
    parser.add_argument("--hf-worker", metavar="DTYPE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.hf_worker:
        return hf_worker(args.hf_worker)

    rows, batch_rows = [], []
    for variant in args.variants:
        dtype = variant.removesuffix("-dense")
        # No prefix cache: the repeats reuse each prompt and must prefill it every time.
        engine = LLMEngine.from_config(
            EngineConfig(
                dtype=dtype,
                max_num_batched_tokens=2048,
                prefix_cache_bytes=0,
                num_threads=args.threads,
                block_weights=not variant.endswith("-dense"),
            )
        )
        hf = HFProcess(dtype, args.threads, same_env=args.hf_env == "same")
        vocab = engine.model_config.vocab_size
        ours_single(engine, random_prompt(64, vocab, 0), 8)  # warm-up
        hf.single(64, 0, 8)
        with torch.inference_mode():
            for ctx in tqdm(args.contexts, desc=f"{variant} contexts"):
                prompt = random_prompt(ctx, vocab, ctx)
                ours, theirs = [], []
                for _ in range(args.repeats):  # interleaved, so drift hits both alike
                    ours.append(ours_single(engine, prompt, args.decode_tokens))
                    theirs.append(hf.single(ctx, ctx, args.decode_tokens))
                o_pre = statistics.median(x[0] for x in ours)
                o_dec = statistics.median(x[1] for x in ours)
                t_pre = statistics.median(x[0] for x in theirs)
                t_dec = statistics.median(x[1] for x in theirs)
                speedup = statistics.median(t[1] / o[1] for o, t in zip(ours, theirs, strict=True))
                rows.append(
                    (variant, ctx, ctx / o_pre, ctx / t_pre, o_dec * 1e3, t_dec * 1e3, speedup)
                )
            batch_prompts = [random_prompt(512, vocab, 100 + i) for i in range(args.batch)]
            singles, batches = [], []
            for _ in range(args.repeats):  # interleaved too: the ratio is of neighbours
                singles.append(ours_single(engine, batch_prompts[0], args.decode_tokens)[1])
                batches.append(ours_batched(engine, batch_prompts, args.decode_tokens))
            # the ratio of each neighbouring pair, then their median: a drift between
            # pairs moves both halves of a pair alike
            ratio = statistics.median(b * s for b, s in zip(batches, singles, strict=True))
            batch_rows.append(
                (variant, statistics.median(batches), 1 / statistics.median(singles), ratio)
            )
        hf.close()
        del engine

    print(
        f"\ntorch threads: {torch.get_num_threads()}; batch 1 unless noted; "
        "HF = transformers generate, same weights and dtype, in its own process; "
        f"OpenMP wait policy: ours {os.environ['OMP_WAIT_POLICY']}, HF {hf.wait_policy}\n"
    )
    print(
        "| variant | context | prefill tok/s ours | prefill tok/s HF | decode ms/tok ours "
        "| decode ms/tok HF | decode speed-up (HF/ours, median of pairs) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype, ctx, op, tp, od, td, speedup in rows:
        print(f"| {dtype} | {ctx} | {op:.0f} | {tp:.0f} | {od:.1f} | {td:.1f} | {speedup:.2f}x |")
    print(
        f"\n| variant | {args.batch} seqs at 512 ctx, tok/s | single stream tok/s "
        "| ratio (median of pairs) |"
    )
    print("|---|---:|---:|---:|")
    for dtype, batched, single, ratio in batch_rows:
        print(f"| {dtype} | {batched:.1f} | {single:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
