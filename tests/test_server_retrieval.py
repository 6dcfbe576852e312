"""Retrieval decode through the real server: a prompt far longer than the device tier,
so every decode step runs the fused exact-retrieval kernel over a host tier, reached
over HTTP with the official `openai` client."""

from __future__ import annotations

import httpx
import openai
import torch

from tests.support.server_process import ServerProcess

PROMPT_TOKENS = 300  # 4 sinks + 16 window on the device: ~280 host rows per layer
NEAR_TIE = 1e-4
LOGPROB_TOL = 1e-4


def _tokens(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (length,), generator=gen).tolist()


def _scanned(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("longserve:index_keys_scanned_total"):
            return float(line.split(" ")[1])
    raise AssertionError("no longserve:index_keys_scanned_total in /metrics")


def test_retrieval_covering_the_host_tier_answers_as_full_attention(tiny_model_dir):
    """With top_k above the host rows the exact top-k is every row, so retrieval must
    pick the same greedy tokens as full attention, with logprobs within 1e-4 (float32; a
    divergence is accepted only at a near-tie, top-2 logprob gap below 1e-4, where
    rounding may pick either); a streamed request over the same host tier then starts
    with the same text."""
    prompt = _tokens(PROMPT_TOKENS, 7)
    flags = ["--served-model-name", "tiny", "--attention", "retrieval", "--sink-tokens", "4",
             "--window-tokens", "16", "--top-k", "512", "--prefix-cache-bytes", "0"]  # fmt: skip
    with ServerProcess(str(tiny_model_dir), *flags) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")

        def greedy(**extra):
            return client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=12,
                temperature=0,
                logprobs=2,
                extra_body={"ignore_eos": True, **extra},
            ).choices[0]

        scanned_before = _scanned(server.url)
        retrieval = greedy()
        assert _scanned(server.url) > scanned_before  # the host tier was searched
        full = greedy(attention="full")
        ours, want = retrieval.logprobs.tokens, full.logprobs.tokens
        assert len(ours) == len(want) == 12
        diverged = next(
            (i for i, (a, b) in enumerate(zip(ours, want, strict=True)) if a != b), None
        )
        if diverged is not None:
            top2 = sorted(full.logprobs.top_logprobs[diverged].values(), reverse=True)[:2]
            assert top2[0] - top2[1] < NEAR_TIE, (diverged, ours, want)
        else:
            assert retrieval.text == full.text
        same = diverged if diverged is not None else len(want)
        for got, expected in zip(
            retrieval.logprobs.token_logprobs[:same],
            full.logprobs.token_logprobs[:same],
            strict=True,
        ):
            assert abs(got - expected) < LOGPROB_TOL  # the same attention, up to rounding

        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=5, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].text for c in stream)
        assert streamed and retrieval.text.startswith(streamed)
