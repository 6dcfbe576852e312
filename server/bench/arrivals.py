"""When each request is sent: Poisson or gamma inter-arrival times, or all at once."""

from __future__ import annotations

import math

import numpy as np


def inter_arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """`n` gaps in seconds between consecutive sends, the first one included.

    Gaps are gamma-distributed with shape `burstiness` and mean `1 / rate`: burstiness 1
    is a Poisson process, below 1 burstier, above 1 more regular. An infinite rate sends
    everything at once (all gaps 0).
    """
    if n < 0:
        raise ValueError("the number of requests must be >= 0")
    if not rate > 0:
        raise ValueError(f"--request-rate must be positive or inf, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def send_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times in seconds after the start (cumulative gaps), so that a late send
    never shifts the ones after it."""
    return np.cumsum(inter_arrival_times(n, rate, burstiness, seed))
