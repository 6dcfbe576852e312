"""`longserve bench serve`: flags, then dataset → run → report, JSON and PNG."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from server.bench.datasets import (
    DATASETS,
    BenchRequest,
    TextTokenizer,
    longctx_requests,
    random_requests,
    sharegpt_requests,
)
from server.bench.metrics import compute_metrics, parse_goodput
from server.bench.report import format_report, result_dict, save_result

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Add `bench serve` to the top-level `longserve` subcommands."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    p = bench.add_parser(
        "serve",
        help="load-test a running OpenAI-compatible server (like `vllm bench serve`)",
        description="Send streaming requests to one server at a set arrival rate and report "
        "throughput and TTFT/TPOT/ITL/E2E latency percentiles.",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server to test")
    p.add_argument("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS)
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument(
        "--tokenizer", default=None, help="local model dir with tokenizer.json (default model's)"
    )
    p.add_argument("--dataset-name", default="random", choices=DATASETS)
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in len x [1 - r, 1 + r]",
    )
    p.add_argument("--longctx-doc-len", type=int, default=4000, help="document tokens")
    p.add_argument("--longctx-output-len", type=int, default=16)
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override reply length")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second (inf: all at once)",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 steadier",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument(
        "--max-duration",
        type=float,
        default=3600.0,
        help="seconds after which no new request is sent",
    )
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:100 (also e2el)",
    )
    p.add_argument("--save-result", default=None, metavar="JSON", help="write results here")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a latency/throughput plot")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _requests(args: argparse.Namespace, tok: TextTokenizer) -> list[BenchRequest]:
    if args.dataset_name == "random":
        return random_requests(
            tok,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.seed,
        )
    if args.dataset_name == "longctx":
        return longctx_requests(
            tok, args.num_prompts, args.longctx_doc_len, args.longctx_output_len, args.seed
        )
    if not args.dataset_path:
        raise ValueError("--dataset-name sharegpt needs --dataset-path FILE")
    return sharegpt_requests(
        tok, args.dataset_path, args.num_prompts, args.sharegpt_output_len, args.seed
    )


def _tokenizer(path: str | None) -> TextTokenizer:
    if path is None:
        from engine.model_files import default_model_dir

        path = default_model_dir()
    return TextTokenizer(path)


def settings_of(args: argparse.Namespace) -> dict:
    keep = (
        "base_url endpoint dataset_name dataset_path num_prompts random_input_len "
        "random_output_len random_range_ratio longctx_doc_len longctx_output_len "
        "sharegpt_output_len request_rate burstiness max_concurrency max_duration num_warmups "
        "temperature ignore_eos seed goodput"
    ).split()
    return {k: getattr(args, k) for k in keep}


def run_bench_serve(args: argparse.Namespace) -> int:
    """Run `bench serve`; exit status 1 if any request failed, 2 if it could not run."""
    from server.bench.client import BenchError, RunConfig, run_benchmark

    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    slos = parse_goodput(args.goodput)
    if args.plot:
        from server.bench.plot import require_matplotlib

        require_matplotlib()  # fail before the run, not after it
    tok = _tokenizer(args.tokenizer)
    requests = _requests(args, tok)
    config = RunConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        max_duration=args.max_duration,
        num_warmups=args.num_warmups,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        request_timeout=args.request_timeout,
        seed=args.seed,
        progress=not args.disable_tqdm,
    )
    try:
        run = asyncio.run(run_benchmark(config, requests, tok))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not run.records:
        print("error: no request was sent before --max-duration", file=sys.stderr)
        return 2
    metrics = compute_metrics(run.records, run.duration_s, slos or None)
    settings = settings_of(args)
    print(format_report(metrics, run, settings))
    for error in sorted({r.error for r in run.records if not r.success})[:5]:
        print(f"failed: {error}", file=sys.stderr)
    if args.save_result:
        save_result(args.save_result, result_dict(metrics, run, settings))
    if args.plot:
        from server.bench.plot import write_plot

        title = (
            f"longserve bench serve: {run.model}, {args.dataset_name}, "
            f"rate {args.request_rate} req/s, {metrics.completed} ok / {metrics.failed} failed"
        )
        write_plot(args.plot, metrics, run, title)
    return 1 if metrics.failed else 0
