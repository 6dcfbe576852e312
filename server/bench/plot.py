"""`--plot`: latency percentiles and throughput over time in one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from server.bench.metrics import BenchMetrics, in_flight_timeline, throughput_timeline

if TYPE_CHECKING:
    from server.bench.client import RunResult

_BIN_S = 5.0


def require_matplotlib() -> None:
    """Raise a one-line ValueError when matplotlib is not installed."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib: pip install matplotlib (it is in longserve's test extras)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(path: str | Path, metrics: BenchMetrics, run: RunResult, title: str) -> None:
    """Left: mean/median/p90/p99 of TTFT, TPOT, ITL and E2E latency (log scale).
    Middle: output tokens/s and completed requests/s in 5 s bins over the run.
    Right: requests in flight over the run."""
    plt = _pyplot()
    fig, (left, right, load) = plt.subplots(1, 3, figsize=(17, 4.8))
    names = ("TTFT", "TPOT", "ITL", "E2E")
    summaries = (metrics.ttft_ms, metrics.tpot_ms, metrics.itl_ms, metrics.e2el_ms)
    stats = ("mean", "median", "p90", "p99")
    width = 0.2
    for k, stat in enumerate(stats):
        values = [getattr(s, stat) for s in summaries]
        xs = [i + (k - 1.5) * width for i in range(len(names))]
        bars = left.bar(xs, values, width, label=stat)
        left.bar_label(bars, fmt="%.0f", fontsize=6, padding=1, rotation=90)
    left.set_xticks(range(len(names)), names)
    left.set_yscale("log")
    left.set_ylabel("latency (ms)")
    left.set_title("Latency percentiles")
    left.legend(fontsize=8)

    starts, tokens, done = throughput_timeline(run.records, run.t0, _BIN_S)
    centers = [s + _BIN_S / 2 for s in starts]
    right.plot(centers, tokens, marker=".", color="tab:blue", label="output tokens/s")
    right.set_xlabel("time since start (s)")
    right.set_ylabel("output tokens/s", color="tab:blue")
    twin = right.twinx()
    twin.plot(centers, done, marker=".", color="tab:orange", label="completed requests/s")
    twin.set_ylabel("completed requests/s", color="tab:orange")
    right.set_title(f"Throughput over time ({_BIN_S:.0f} s bins)")
    flight = in_flight_timeline(run.records, run.t0, 1.0)
    load.step(range(len(flight)), flight, where="post", color="tab:green")
    load.set_xlabel("time since start (s)")
    load.set_ylabel("requests in flight")
    load.set_title("Requests in flight")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
