"""Pure functions from per-request timings to the benchmark's summary numbers.

Definitions follow `vllm bench serve`: TTFT is send → first streamed token; TPOT is
(E2E − TTFT) / (output tokens − 1), so it excludes the first token; ITL is the gap
between consecutive streamed chunks, pooled over all requests; E2E is send → last chunk.
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds on one monotonic clock."""

    success: bool
    prompt_len: int = 0
    output_len: int = 0  # tokens generated (server usage, else streamed chunks)
    start: float = 0.0  # when the request was sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each token chunk
    end: float = 0.0  # when the response finished (or failed)
    error: str = ""

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for fewer than two tokens."""
        if self.ttft is None or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass
class Summary:
    """mean/median/p90/p99 of one latency, in milliseconds."""

    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> Summary:
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(np.percentile(ms, p)) for p in PERCENTILES)
        return cls(float(ms.mean()), p50, p90, p99)


@dataclass
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # generated tokens / s
    total_token_throughput: float  # (prompt + generated) tokens / s
    ttft_ms: Summary
    tpot_ms: Summary
    itl_ms: Summary
    e2el_ms: Summary
    goodput: float | None = None  # requests / s meeting every SLO, when SLOs are given
    good_requests: int | None = None


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` → `{"ttft": 0.2, "tpot": 0.05}` (milliseconds in, seconds out)."""
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"--goodput expects NAME:MS with NAME in {', '.join(GOODPUT_METRICS)}, got {spec!r}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {spec!r}: {value!r} is not a number") from None
        if ms <= 0:
            raise ValueError(f"--goodput {spec!r}: the limit must be positive")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a successful request is within every SLO (a missing TPOT counts as 0)."""
    values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.latency}
    return record.success and all(
        values[name] is not None and values[name] <= limit for name, limit in slos.items()
    )


def compute_metrics(
    records: list[RequestRecord], duration_s: float, slos: dict[str, float] | None = None
) -> BenchMetrics:
    """Summarise a run; `duration_s` is the wall time from first send to last completion."""
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    good = sum(meets_slos(r, slos) for r in ok) if slos else None
    return BenchMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        ttft_ms=Summary.of([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=Summary.of([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=Summary.of([gap for r in ok for gap in r.itls]),
        e2el_ms=Summary.of([r.latency for r in ok]),
        goodput=good / duration_s if good is not None else None,
        good_requests=good,
    )


def throughput_timeline(
    records: list[RequestRecord], t0: float, bin_s: float = 1.0
) -> tuple[list[float], list[float], list[float]]:
    """Per time bin since `t0`: bin starts, output tokens per second, completions per
    second. A request's tokens are spread evenly over its streamed chunks, each counted in
    the bin where it arrived, so the curve shows load over time."""
    ok = [r for r in records if r.success]
    if not ok:
        return [], [], []
    last = max(r.end for r in ok) - t0
    bins = max(1, int(np.ceil(last / bin_s)))
    tokens = np.zeros(bins)
    done = np.zeros(bins)
    for r in ok:
        per_chunk = r.output_len / len(r.chunk_times) if r.chunk_times else 0.0
        for t in r.chunk_times:
            tokens[min(int((t - t0) / bin_s), bins - 1)] += per_chunk
        done[min(int((r.end - t0) / bin_s), bins - 1)] += 1
    starts = [i * bin_s for i in range(bins)]
    return starts, list(tokens / bin_s), list(done / bin_s)


def in_flight_timeline(records: list[RequestRecord], t0: float, bin_s: float = 1.0) -> list[int]:
    """Requests in flight (sent, not yet finished) at the start of each time bin since `t0`."""
    if not records:
        return []
    bins = max(1, int(np.ceil((max(r.end for r in records) - t0) / bin_s)))
    return [sum(r.start <= t0 + i * bin_s < r.end for r in records) for i in range(bins)]
