"""Forked caches are independent copies, in every backend."""

from __future__ import annotations

import pytest
import torch

from engine.attention_backend import CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.tiered_attention import TieredAttentionBackend

SHAPE = CacheShape(num_layers=2, num_kv_heads=2, head_dim=16)


def _step(backend, cache, q, k, v):
    n = q.shape[0]
    ctx = ForwardContext([SequenceSlice(cache, 0, n, backend.cache_len(cache))], backend)
    return [backend.forward(layer, q, k, v, ctx, 0.25) for layer in range(SHAPE.num_layers)]


def _qkv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 4, 16, generator=g),
        torch.randn(n, 2, 16, generator=g),
        torch.randn(n, 2, 16, generator=g),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: FullAttentionBackend(SHAPE),
        lambda: TieredAttentionBackend(SHAPE, "retrieval", sink_tokens=4, window_tokens=8),
        lambda: TieredAttentionBackend(SHAPE, "streaming", sink_tokens=4, window_tokens=8),
    ],
    ids=["full", "retrieval", "streaming"],
)
def test_fork_then_diverge_equals_separate_runs(make):
    backend = make()
    prompt = _qkv(40, 0)
    original = backend.new_cache()
    _step(backend, original, *prompt)
    forked = backend.fork(original)
    a_next, b_next = _qkv(1, 1), _qkv(1, 2)
    out_a = _step(backend, original, *a_next)
    out_b = _step(backend, forked, *b_next)

    for nxt, got in ((a_next, out_a), (b_next, out_b)):
        fresh = backend.new_cache()
        _step(backend, fresh, *prompt)
        want = _step(backend, fresh, *nxt)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        backend.free(fresh)
    backend.free(original)
    backend.free(forked)
    assert backend.memory_stats()["device_bytes"] == 0
