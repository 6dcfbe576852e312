"""Run a GIL-releasing compiled kernel over index ranges on several Python threads."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

# Serial kernels: numba's workqueue pool stalls for milliseconds when another process
# holds the cores. Work is split across Python threads instead (the kernels release the
# GIL), as many as torch's intra-op threads, but only when torch's OpenMP workers sleep
# between ops (see engine/__init__.py): spinning ones make the split slower.
SPLIT_WORK = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"

_pool: ThreadPoolExecutor | None = None


def split_parts(units: int, min_units_per_part: int = 1) -> int:
    """How many threads to give `units` of work: 1 unless splitting is on and pays."""
    if not SPLIT_WORK:
        return 1
    return max(1, min(torch.get_num_threads(), units // min_units_per_part))


def run_ranges(kernel: Callable[..., None], cuts: Sequence[int], *args, after: tuple = ()) -> None:
    """Call kernel(*args, lo, hi, *after) for consecutive [lo, hi) of `cuts`, the first on
    this thread and the rest on pool threads, and wait for all of them."""
    global _pool
    ranges = [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) if hi > lo]
    if not ranges:
        return
    extra = len(ranges) - 1
    if extra and (_pool is None or _pool._max_workers < extra):
        _pool = ThreadPoolExecutor(extra, thread_name_prefix="kernel-split")
    futures = [_pool.submit(kernel, *args, lo, hi, *after) for lo, hi in ranges[1:]]
    kernel(*args, *ranges[0], *after)
    for future in futures:
        future.result()


def run_split(
    kernel: Callable[..., None], units: int, parts: int, *args, after: tuple = ()
) -> None:
    """kernel(*args, lo, hi, *after) over [0, units) cut into `parts` about equal ranges
    (see run_ranges); one plain call when parts <= 1."""
    if parts <= 1:
        kernel(*args, 0, units, *after)
    else:
        run_ranges(kernel, [units * i // parts for i in range(parts + 1)], *args, after=after)
