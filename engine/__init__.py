"""longserve's engine: models, scheduler, KV tiers, sampling and the offline API."""

import os
import sys

# The decode kernel splits large batches across Python threads; torch's OpenMP workers
# spinning on the cores after each op starve them (measured: 16 sequences at 512 tokens,
# 159 ms per step with passive workers vs 223 ms spinning). Only effective before torch
# loads its OpenMP runtime, so only set then; a user's own setting wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch and transformers; keep `import engine` light for the CLI.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
