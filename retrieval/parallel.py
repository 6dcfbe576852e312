"""Build many indexes at once (one per layer and head) on a thread pool.

Threads pay off because the heavy parts release the GIL: faiss and hnswlib do, numpy's
matmul does, and the attention-aware graph kernels are numba `nogil` functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from retrieval.base import KeyIndex


@dataclass
class BuildJob:
    """One `index.build(keys, queries)` call."""

    index: KeyIndex
    keys: np.ndarray
    queries: np.ndarray | None = None

    def run(self) -> KeyIndex:
        self.index.build(self.keys, self.queries)
        return self.index


def build_indexes(
    jobs: Sequence[BuildJob | tuple],
    num_threads: int | None = None,
    progress: bool = True,
    desc: str = "building indexes",
) -> list[KeyIndex]:
    """Run the build jobs on `num_threads` threads (default: CPU count); returns the
    indexes in job order. Jobs may be `BuildJob`s or (index, keys[, queries]) tuples.
    Indexes sharing a `KeyStore` may be built concurrently. The first failure is
    re-raised after the running builds finish.
    """
    jobs = [j if isinstance(j, BuildJob) else BuildJob(*j) for j in jobs]
    if num_threads is None:
        num_threads = os.cpu_count() or 1
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    with tqdm(total=len(jobs), desc=desc, disable=not progress, unit="index") as bar:
        if num_threads == 1:
            for job in jobs:
                job.run()
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=num_threads) as pool:
                futures = [pool.submit(job.run) for job in jobs]
                try:
                    for future in as_completed(futures):
                        future.result()
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    return [job.index for job in jobs]
