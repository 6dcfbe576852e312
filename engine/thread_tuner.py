"""Choose the torch thread count of batched decode steps by their measured speed.

On a shared VM, handing work from one core to the other sometimes gets slow for minutes
at a time: on the 2-core test VM a 16-sequence decode step on two threads took ~100 ms
in one minute and 210-240 ms in the next, while on one thread it stayed at 113-152 ms
(benchmarks/README.md). No fixed count is right in both phases, so the runner times its
batched decode steps on one thread and on all, runs on the faster, and every
`probe_every`-th step of a kind runs on the other count to notice when that changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class _KindTimes:
    """Smoothed seconds per token of one kind of step, by thread count."""

    seconds: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    best: int | None = None


class ThreadTuner:
    """Per kind of step (decode batches, by size: 2-3, 4-7, 8-15, ... sequences), the
    faster of one thread and `all_threads`, from an exponential average of each one's
    seconds per token."""

    def __init__(self, all_threads: int, probe_every: int = 16, smoothing: float = 0.3) -> None:
        if all_threads < 1 or probe_every < 2 or not 0 < smoothing <= 1:
            raise ValueError("need all_threads >= 1, probe_every >= 2, 0 < smoothing <= 1")
        self.candidates = (all_threads, 1) if all_threads > 1 else (1,)
        self.probe_every = probe_every
        self.smoothing = smoothing
        self._kinds: dict[int, _KindTimes] = {}

    @staticmethod
    def kind(batch: int) -> int:
        """The kind of a decode step of `batch` sequences: its power-of-two bucket."""
        return batch.bit_length()

    def choose(self, kind: int) -> int:
        """The thread count for the next step of `kind`: each count once to start, then
        the faster, except every `probe_every`-th step, which tries the other."""
        times = self._kinds.setdefault(kind, _KindTimes())
        times.steps += 1
        for count in self.candidates:
            if count not in times.seconds:
                return count
        if times.steps % self.probe_every == 0 and len(self.candidates) > 1:
            return next(c for c in self.candidates if c != times.best)
        return times.best

    def record(self, kind: int, threads: int, seconds: float, tokens: int) -> None:
        """Add a step of `kind` that took `seconds` on `threads` for `tokens` tokens."""
        times = self._kinds.setdefault(kind, _KindTimes())
        per_token = seconds / max(tokens, 1)
        old = times.seconds.get(threads)
        times.seconds[threads] = (
            per_token if old is None else old + self.smoothing * (per_token - old)
        )
        if len(times.seconds) < len(self.candidates):
            return
        best = min(times.seconds, key=times.seconds.get)
        if best != times.best:
            if times.best is not None:
                logger.info(
                    "Decode batches of %d-%d sequences now run on %d thread(s): %.1f vs %.1f "
                    "ms per token",
                    1 << (kind - 1),
                    (1 << kind) - 1,
                    best,
                    times.seconds[best] * 1e3,
                    times.seconds[times.best] * 1e3,
                )
            times.best = best

    def best(self, kind: int) -> int | None:
        """The count now preferred for `kind` (None before both are measured)."""
        times = self._kinds.get(kind)
        return None if times is None else times.best
