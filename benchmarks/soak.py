"""Soak test: N concurrent streaming clients for a fixed time against one server.

Records the server's resident memory before and after, checks that `/metrics` is back
to 0 running requests, and prints `bench serve`'s report. Usage (repo root):

    .venv/bin/python benchmarks/soak.py [--clients 64] [--duration 300]
    .venv/bin/python benchmarks/soak.py --base-url http://127.0.0.1:8000 --pid PID

Without --base-url it starts `longserve serve --max-model-len 2048 [--num-threads N]`
with the default model itself. "Before" is measured after one untimed round of N requests (the first
requests allocate workspaces that stay for the life of the process) and a pause; the
RSS of the idle, freshly started server is reported as well. Exit status 0 only when
no request failed, RSS after is within --rss-tolerance of before, and 0 are running.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model_files import default_model_dir  # noqa: E402
from server.bench.client import RunConfig, run_benchmark  # noqa: E402
from server.bench.datasets import TextTokenizer, random_requests  # noqa: E402
from server.bench.metrics import compute_metrics  # noqa: E402
from server.bench.report import format_report, result_dict, save_result  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (psutil when installed, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def gauge(metrics_text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", metrics_text, re.MULTILINE)
    if not match:
        raise RuntimeError(f"{name} missing from /metrics")
    return float(match.group(1))


def wait_idle(base_url: str, timeout: float) -> tuple[float, float]:
    """Poll /metrics until no request is running or waiting; returns the last values."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
        running = gauge(text, "longserve:num_requests_running")
        waiting = gauge(text, "longserve:num_requests_waiting")
        if (running == 0 and waiting == 0) or time.monotonic() > deadline:
            return running, waiting
        time.sleep(1)


def soak(args: argparse.Namespace, base_url: str, pid: int) -> int:
    tok = TextTokenizer(default_model_dir())
    pool = random_requests(tok, 512, args.input_len, args.output_len, seed=args.seed)
    config = RunConfig(
        base_url=base_url,
        max_concurrency=args.clients,
        num_warmups=0,
        ignore_eos=True,
        seed=args.seed,
        progress=False,
    )
    rss_idle = rss_bytes(pid)
    print(f"RSS idle after start: {rss_idle / 2**20:.1f} MiB; warm-up round of {args.clients}")
    asyncio.run(run_benchmark(config, pool[: args.clients], tok))
    wait_idle(base_url, 120)
    time.sleep(args.settle)
    rss_before = rss_bytes(pid)
    print(f"RSS before: {rss_before / 2**20:.1f} MiB; soaking {args.duration:.0f} s")

    # Enough requests that the clients never run out before the deadline (>= 1 s each).
    n = args.clients * int(args.duration)
    config.max_duration = args.duration
    run = asyncio.run(run_benchmark(config, [pool[i % len(pool)] for i in range(n)], tok))
    running, waiting = wait_idle(base_url, 120)
    time.sleep(args.settle)
    rss_after = rss_bytes(pid)

    metrics = compute_metrics(run.records, run.duration_s)
    settings = {
        "clients": args.clients,
        "duration": args.duration,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_concurrency": args.clients,
        "request_rate": None,
    }
    print(format_report(metrics, run, settings))
    change = (rss_after - rss_before) / rss_before
    ok = metrics.failed == 0 and abs(change) <= args.rss_tolerance and running == 0
    print(f"RSS idle after start:   {rss_idle / 2**20:10.1f} MiB")
    print(f"RSS before (warmed up): {rss_before / 2**20:10.1f} MiB")
    print(f"RSS after:              {rss_after / 2**20:10.1f} MiB ({change:+.2%})")
    print(f"/metrics after: running {running:.0f}, waiting {waiting:.0f}")
    print(f"max requests in flight: {run.max_in_flight}")
    print("PASS" if ok else "FAIL")
    if args.save_result:
        result = result_dict(metrics, run, settings)
        for key in ("input_lens", "output_lens", "ttfts_s", "e2els_s", "start_offsets_s", "itls_s"):
            result.pop(key)  # thousands of requests: keep the summary only
        result.update(
            rss_idle_bytes=rss_idle,
            rss_before_bytes=rss_before,
            rss_after_bytes=rss_after,
            rss_change=change,
            running_after=running,
            waiting_after=waiting,
            passed=ok,
        )
        save_result(args.save_result, result)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--settle", type=float, default=5.0, help="pause before reading RSS")
    p.add_argument("--rss-tolerance", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-url", default=None, help="an already running server")
    p.add_argument("--pid", type=int, default=None, help="its process id (for RSS)")
    p.add_argument("--save-result", default=None, metavar="JSON")
    p.add_argument("--num-threads", type=int, default=None, help="for the server it starts")
    args = p.parse_args()
    if args.base_url:
        if args.pid is None:
            p.error("--base-url needs --pid to read the server's memory")
        return soak(args, args.base_url, args.pid)
    threads = ["--num-threads", str(args.num_threads)] if args.num_threads else []
    with ServerProcess("--max-model-len", "2048", *threads) as server:
        return soak(args, server.url, server.proc.pid)


if __name__ == "__main__":
    sys.exit(main())
