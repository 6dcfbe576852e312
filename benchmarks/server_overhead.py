"""HTTP serving overhead: 8 concurrent streams through the server vs the offline engine.

Same prompts, greedy, fixed output length, measured in one run. Usage (repo root):

    .venv/bin/python benchmarks/server_overhead.py [--streams 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from tests.support.server_process import ServerProcess  # noqa: E402


def prompts(count: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 49152, (length,), generator=gen).tolist() for _ in range(count)]


def offline_tokens_per_s(batch: list[list[int]], tokens: int) -> float:
    engine = LLMEngine.from_config(EngineConfig(prefix_cache_bytes=0))  # prompts repeat
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(batch[:2]):  # warm-up
        engine.add_request(f"warm-{i}", p, SamplingParams(max_tokens=4, temperature=0))
    while engine.has_unfinished():
        engine.step()
    start, produced = time.perf_counter(), 0
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, params)
    while engine.has_unfinished():
        produced += len(engine.step())
    return produced / (time.perf_counter() - start)


async def _stream(client: httpx.AsyncClient, url: str, prompt: list[int], tokens: int) -> int:
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
    return usage


async def http_tokens_per_s(url: str, batch: list[list[int]], tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(_stream(client, url, p, 4) for p in batch[:2]))  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(_stream(client, url, p, tokens) for p in batch))
        return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    args = parser.parse_args()
    batch = prompts(args.streams, args.prompt_tokens)
    offline = offline_tokens_per_s(batch, args.tokens)
    gc.collect()
    with ServerProcess("--no-prefix-cache") as server:
        served = asyncio.run(http_tokens_per_s(server.url, batch, args.tokens))
    print(
        f"\n{args.streams} concurrent streams, {args.prompt_tokens}-token prompts, "
        f"{args.tokens} tokens each, greedy, fp32, torch threads {torch.get_num_threads()}\n"
    )
    print("| path | tokens/s | vs offline |")
    print("|---|---:|---:|")
    print(f"| offline engine | {offline:.1f} | 1.00x |")
    print(f"| HTTP streaming | {served:.1f} | {served / offline:.2f}x |")


if __name__ == "__main__":
    main()
