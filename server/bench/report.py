"""The printed report and the `--save-result` JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.bench.metrics import BenchMetrics, Summary

if TYPE_CHECKING:
    from server.bench.client import RunResult

_WIDTH = 50
_LATENCIES = (
    ("ttft_ms", "TTFT", "Time to First Token"),
    ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl_ms", "ITL", "Inter-token Latency"),
    ("e2el_ms", "E2EL", "End-to-end Latency"),
)


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value:>10}"


def format_report(metrics: BenchMetrics, run: RunResult, settings: dict[str, Any]) -> str:
    """A fixed-width table like `vllm bench serve` prints."""
    rate = settings.get("request_rate")
    lines = [
        " Serving Benchmark Result ".center(_WIDTH, "="),
        _row("Model:", run.model),
        _row("Request rate (req/s):", "inf" if rate is None or math.isinf(rate) else rate),
        _row("Max concurrency:", settings.get("max_concurrency") or "none"),
        _row("Successful requests:", metrics.completed),
        _row("Failed requests:", metrics.failed),
    ]
    if run.not_sent:
        lines.append(_row("Not sent (--max-duration):", run.not_sent))
    lines += [
        _row("Benchmark duration (s):", metrics.duration_s),
        _row("Total input tokens:", metrics.total_input_tokens),
        _row("Total generated tokens:", metrics.total_output_tokens),
        _row("Request throughput (req/s):", metrics.request_throughput),
        _row("Output token throughput (tok/s):", metrics.output_throughput),
        _row("Total token throughput (tok/s):", metrics.total_token_throughput),
    ]
    if metrics.goodput is not None:
        lines.append(_row("Request goodput (req/s):", metrics.goodput))
    for key, short, title in _LATENCIES:
        s: Summary = getattr(metrics, key)
        lines.append(f" {title} ".center(_WIDTH, "-"))
        lines += [
            _row(f"Mean {short} (ms):", s.mean),
            _row(f"Median {short} (ms):", s.median),
            _row(f"P90 {short} (ms):", s.p90),
            _row(f"P99 {short} (ms):", s.p99),
        ]
    lines.append("=" * _WIDTH)
    if not run.usage_from_server:
        lines.append("note: the server sent no usage; output tokens = streamed chunks")
    return "\n".join(lines)


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


def result_dict(metrics: BenchMetrics, run: RunResult, settings: dict[str, Any]) -> dict:
    """Everything needed to compare runs: settings, the summary, and per-request data."""
    ok = [r for r in run.records if r.success]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": run.model,
        "settings": {
            k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in settings.items()
        },
        **asdict(metrics),
        "not_sent": run.not_sent,
        "max_in_flight": run.max_in_flight,
        "output_tokens_from": "server usage" if run.usage_from_server else "streamed chunks",
        "input_lens": [r.prompt_len for r in ok],
        "output_lens": [r.output_len for r in ok],
        "ttfts_s": [_us(r.ttft) for r in ok],
        "e2els_s": [_us(r.latency) for r in ok],
        "start_offsets_s": [_us(r.start - run.t0) for r in ok],
        "itls_s": [[_us(x) for x in r.itls] for r in ok],
        "errors": [r.error for r in run.records if not r.success],
    }


def save_result(path: str | Path, result: dict) -> None:
    """One top-level key per line; per-request lists stay on their line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items())
    path.write_text("{\n" + body + "\n}\n")
