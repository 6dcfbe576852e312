"""ANN indexes behind the tiered backend: exact when they scan everything, close otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attention_backend import CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.index_retriever import IndexRetriever, retriever_factory
from engine.tiered_attention import TieredAttentionBackend

SHAPE = CacheShape(num_layers=2, num_kv_heads=2, head_dim=32)
HQ = 6


def _run(backend, chunks, decodes):
    cache = backend.new_cache()
    outs = []
    for q, k, v in chunks + decodes:
        n = q.shape[0]
        ctx = ForwardContext([SequenceSlice(cache, 0, n, backend.cache_len(cache))], backend)
        outs.append([backend.forward(layer, q, k, v, ctx, 32**-0.5) for layer in range(2)])
    return cache, outs


def _retrieval_backend(kind: str, top_k: int) -> TieredAttentionBackend:
    """Retrieval mode over an index of `kind`: 16 sinks, a 64-token window."""
    return TieredAttentionBackend(
        SHAPE,
        "retrieval",
        sink_tokens=16,
        window_tokens=64,
        top_k=top_k,
        retriever_factory=retriever_factory(kind),
    )


def _data(prefill: int, decode_steps: int):
    g = torch.Generator().manual_seed(0)

    def qkv(n):
        q = torch.randn(n, HQ, 32, generator=g) + 0.5  # queries off the keys' distribution
        return q, torch.randn(n, 2, 32, generator=g), torch.randn(n, 2, 32, generator=g)

    chunks = [qkv(256) for _ in range(prefill // 256)]
    return chunks, [qkv(1) for _ in range(decode_steps)]


def test_flat_index_scanning_everything_equals_full_attention():
    chunks, decodes = _data(1024, 8)
    full = FullAttentionBackend(SHAPE)
    tiered = _retrieval_backend("faiss-flat", top_k=10_000)
    _, want = _run(full, chunks, decodes)
    cache, got = _run(tiered, chunks, decodes)
    assert isinstance(cache.retriever, IndexRetriever)
    for w_step, g_step in zip(want, got, strict=True):
        for w, g in zip(w_step, g_step, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # the 8 keys that left the window while decoding wait, searched exactly, for a block
    retriever = cache.retriever
    assert retriever.indexes[0][0].size == retriever.indexed[0] == cache.host_len[0] - 8


def test_full_blocks_are_added_incrementally_without_rebuild():
    chunks, decodes = _data(1024, 70)
    tiered = _retrieval_backend("faiss-flat", top_k=10_000)
    _, want = _run(FullAttentionBackend(SHAPE), chunks, decodes)
    cache, got = _run(tiered, chunks, decodes)
    retriever = cache.retriever
    first_index = retriever.indexes[1][0]
    assert retriever.indexed[1] == cache.host_len[1] - 70 + 64  # one block of 64 added
    assert first_index.size == retriever.indexed[1]
    for w, g in zip(want[-1], got[-1], strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["attention-aware", "hnswlib", "faiss-hnsw", "faiss-ivf"])
def test_approximate_indexes_stay_close_to_full_attention(kind):
    chunks, decodes = _data(2048, 4)
    full = FullAttentionBackend(SHAPE)
    exact = TieredAttentionBackend(SHAPE, "retrieval", sink_tokens=16, window_tokens=64, top_k=64)
    ann = _retrieval_backend(kind, top_k=64)
    streaming = TieredAttentionBackend(SHAPE, "streaming", sink_tokens=16, window_tokens=64)
    _, ref = _run(full, chunks, decodes)
    errors = {}
    for name, backend in (("exact", exact), ("ann", ann), ("streaming", streaming)):
        cache, outs = _run(backend, chunks, decodes)
        errors[name] = max(
            (o[1] - r[1]).abs().max().item()
            for o, r in zip(outs, ref, strict=True)
            if o[1].shape[0] == 1
        )
        if name == "ann":
            assert cache.retriever.scanned > 0 and cache.retriever.queries > 0
    assert errors["ann"] < errors["streaming"]
    assert errors["ann"] <= errors["exact"] + 0.05


def test_unknown_index_kind_is_rejected():
    with pytest.raises(ValueError, match="valid kinds"):
        retriever_factory("annoy")


def test_batched_searches_on_threads_equal_serial_ones(monkeypatch):
    """A decode batch's host searches run on several threads when splitting is on; the
    outputs equal those of the same batch searched on one thread."""
    import kernels.thread_split as split

    chunks, decodes = _data(1024, 3)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(split, "SPLIT_WORK", threads > 1)
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        backend = TieredAttentionBackend(
            SHAPE,
            "retrieval",
            sink_tokens=16,
            window_tokens=64,
            top_k=32,
            retriever_factory=retriever_factory("attention-aware"),
        )
        cache = backend.new_cache()
        for q, k, v in chunks:
            ctx = ForwardContext(
                [SequenceSlice(cache, 0, q.shape[0], backend.cache_len(cache))], backend
            )
            for layer in range(2):
                backend.forward(layer, q, k, v, ctx, 32**-0.5)
        batch = [cache] + [backend.fork(cache) for _ in range(3)]
        outs = []
        for q, k, v in decodes:
            qb, kb, vb = (t.expand(4, *t.shape[1:]).contiguous() for t in (q, k, v))
            slices = [SequenceSlice(c, i, 1, backend.cache_len(c)) for i, c in enumerate(batch)]
            ctx = ForwardContext(slices, backend)
            outs.append([backend.forward(layer, qb, kb, vb, ctx, 32**-0.5) for layer in range(2)])
        results.append(outs)
    for serial, threaded in zip(*results, strict=True):
        for a, b in zip(serial, threaded, strict=True):
            assert torch.equal(a, b)


def test_each_search_is_seeded_with_the_previous_result(monkeypatch):
    """A query head's search starts from its result at the layer's previous decode step."""
    from retrieval.attention_aware import AttentionAwareIndex

    seen = []
    search = AttentionAwareIndex.search

    def recording(self, queries, k, seeds=None):
        result = search(self, queries, k, seeds)
        seen.append((None if seeds is None else seeds.copy(), result.ids.copy()))
        return result

    monkeypatch.setattr(AttentionAwareIndex, "search", recording)
    chunks, decodes = _data(1024, 3)
    tiered = _retrieval_backend("attention-aware", top_k=32)
    _run(tiered, chunks, decodes)
    per_step = SHAPE.num_layers * SHAPE.num_kv_heads  # searches per decode step
    assert len(seen) == 3 * per_step
    assert all(seeds is None for seeds, _ in seen[:per_step])
    for (seeds, _), (_, before) in zip(seen[per_step:], seen[:-per_step], strict=True):
        np.testing.assert_array_equal(seeds, before)


def test_a_shared_segment_is_not_seeded_across_sequences():
    """A prefix-cache segment is searched by several sequences: its retriever keeps no
    previous result, so a search's answer does not depend on who searched before."""
    from engine.tiered_cache import HostSegment, _QuerySampler

    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(2, 600, 32, generator=g) for _ in range(SHAPE.num_layers)]
    values = [torch.randn(2, 600, 32, generator=g) for _ in range(SHAPE.num_layers)]
    samplers = []
    for _ in range(SHAPE.num_layers):
        sampler = _QuerySampler(256)
        sampler.add(torch.randn(600, HQ, 32, generator=g) + 0.5, 0)
        samplers.append(sampler)
    segment = HostSegment(SHAPE, keys, values, samplers, retriever_factory("attention-aware"))
    q_a, q_b = torch.randn(HQ, 32, generator=g) + 0.5, torch.randn(HQ, 32, generator=g) + 0.5
    first = segment.search(0, q_a, 16)
    segment.search(0, q_b, 16)  # another sequence's step in between
    assert torch.equal(segment.search(0, q_a, 16), first)
    assert segment.retriever.previous_ids == [None] * SHAPE.num_layers
