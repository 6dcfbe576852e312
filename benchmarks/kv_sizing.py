"""KV-cache memory per sequence for sizing a deployment (docs/deploy.md).

For each attention mode and context length, one random-token prompt is prefilled through
the default model by the engine the server runs (`LLMEngine`, fp32); right after its
first generated token, while the sequence is live, `LLMEngine.memory_stats()` gives the
bytes held in the device tier and in the host tier (K/V buffers as allocated, query
samples and the index) — the numbers `/metrics` exports as `longserve:kv_cache_bytes`.
The document (prefix) cache is off so that nothing is shared between sequences.
Usage (repo root):

    .venv/bin/python benchmarks/kv_sizing.py [--contexts 2048 8000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

SETUPS = (("full", "exact"), ("retrieval", "exact"), ("retrieval", "attention-aware"))
# Host-tier indexes are built lazily (first search or first key moved to the host tier);
# measure after a few decode steps so that they are included.
DECODE_STEPS = 3


def measure(engine: LLMEngine, context: int) -> dict[str, int]:
    prompt = torch.randint(17, 49152, (context,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request("sizing", prompt.tolist(), params)
    produced = 0
    while produced < DECODE_STEPS:  # prefill chunks produce no output until the first token
        produced += len(engine.step())
    stats = engine.memory_stats()
    engine.abort("sizing")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8000])
    args = parser.parse_args()
    rows = []
    for mode, index in SETUPS:
        config = EngineConfig(
            attention=mode,
            index=index,
            max_model_len=max(args.contexts) + 16,
            prefix_cache_bytes=0,  # measure one sequence's own tiers, nothing shared
        )
        engine = LLMEngine.from_config(config)
        for context in args.contexts:
            s = measure(engine, context)
            rows.append((mode, index if mode == "retrieval" else "-", context, s))
            print(f"{mode} {index} {context}: {s}", file=sys.stderr)
        del engine
    print(
        "| mode | index | context | device tokens | device MiB/seq | host tokens "
        "| host MiB/seq | host MiB per 1K context tokens |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode, index, context, s in rows:
        mib = 2**20
        print(
            f"| {mode} | {index} | {context} | {s['device_tokens']} | "
            f"{s['device_bytes'] / mib:.1f} | {s['host_tokens']} | {s['host_bytes'] / mib:.1f} | "
            f"{s['host_bytes'] / mib / (context / 1000):.1f} |"
        )


if __name__ == "__main__":
    main()
