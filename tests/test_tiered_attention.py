"""The tiered (retrieval / streaming) attention backend at backend level, random q/k/v."""

import pytest
import torch

from engine.attention_backend import CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.tiered_attention import TieredAttentionBackend
from engine.tiered_cache import ExactRetriever, HostRetriever, TieredCache

HQ, HKV, D = 9, 3, 64
SCALE = D**-0.5


def shape(layers: int = 2) -> CacheShape:
    return CacheShape(num_layers=layers, num_kv_heads=HKV, head_dim=D)


def qkv(n: int, layers: int, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: q [n, Hq, D], k, v [n, Hkv, D]."""
    return [
        (
            torch.randn(n, HQ, D, generator=gen),
            torch.randn(n, HKV, D, generator=gen),
            torch.randn(n, HKV, D, generator=gen),
        )
        for _ in range(layers)
    ]


def run_step(backend, caches, work):
    """work: list of (cache index, per-layer qkv of its new tokens). Returns per-cache outputs
    as a list (per layer) of [num_new, Hq, D]."""
    slices, start = [], 0
    for i, inputs in work:
        n = inputs[0][0].shape[0]
        slices.append(SequenceSlice(caches[i], start, n, backend.cache_len(caches[i])))
        start += n
    ctx = ForwardContext(slices=slices, backend=backend)
    outs = []
    for layer in range(backend.shape.num_layers):
        packed = [torch.cat([inputs[layer][j] for _, inputs in work]) for j in range(3)]
        outs.append(backend.forward(layer, *packed, ctx, SCALE))
    return [[o[s.start : s.end] for o in outs] for s in slices]


def run_alongside(backends, chunks, decodes, layers, seed=0):
    """Feed one sequence the same inputs through each backend; yield outputs per step."""
    gen = torch.Generator().manual_seed(seed)
    caches = [b.new_cache() for b in backends]
    for n in list(chunks) + [1] * decodes:
        inputs = qkv(n, layers, gen)
        yield [run_step(b, [c], [(0, inputs)])[0] for b, c in zip(backends, caches, strict=True)]


@pytest.mark.parametrize(
    "sinks,window,chunks,decodes,layers",
    [
        (16, 64, [1000, 1200, 800], 64, 3),
        (128, 512, [100, 300, 1100, 500], 16, 2),
    ],
)
def test_retrieval_with_large_top_k_equals_full(sinks, window, chunks, decodes, layers):
    full = FullAttentionBackend(shape(layers))
    tiered = TieredAttentionBackend(
        shape(layers), "retrieval", sink_tokens=sinks, window_tokens=window, top_k=1 << 14
    )
    steps = 0
    for ref, got in run_alongside([full, tiered], chunks, decodes, layers):
        for r, g in zip(ref, got, strict=True):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
        steps += 1
    assert steps == len(chunks) + decodes
    total = sum(chunks) + decodes
    stats = tiered.memory_stats()
    assert stats["host_tokens"] == total - sinks - window
    assert stats["device_tokens"] == sinks + window


@pytest.mark.parametrize("mode,top_k", [("retrieval", 8), ("streaming", 100)])
def test_packed_sequences_match_each_alone(mode, top_k):
    layers = 2
    kwargs = dict(mode=mode, sink_tokens=16, window_tokens=64, top_k=top_k)
    # Per step, the new-token counts of three sequences (0 = not scheduled).
    plan = [(300, 50, 500), (1, 1, 400), (1, 0, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1)]
    gen = torch.Generator().manual_seed(1)
    inputs = [[qkv(n, layers, gen) if n else None for n in step] for step in plan]

    packed = TieredAttentionBackend(shape(layers), **kwargs)
    caches = [packed.new_cache() for _ in range(3)]
    together = []
    for step in inputs:
        work = [(i, x) for i, x in enumerate(step) if x is not None]
        outs = run_step(packed, caches, work)
        together.append({i: o for (i, _), o in zip(work, outs, strict=True)})

    for i in range(3):
        alone = TieredAttentionBackend(shape(layers), **kwargs)
        cache = alone.new_cache()
        for t, step in enumerate(inputs):
            if step[i] is None:
                continue
            outs = run_step(alone, [cache], [(0, step[i])])[0]
            for a, b in zip(outs, together[t][i], strict=True):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert alone.cache_len(cache) == packed.cache_len(caches[i])


def test_device_bytes_do_not_grow_with_context():
    backend = TieredAttentionBackend(shape(1), "retrieval")  # defaults: S=128, W=512
    gen = torch.Generator().manual_seed(2)
    cache = backend.new_cache()
    for n in (600, 400):
        run_step(backend, [cache], [(0, qkv(n, 1, gen))])
    at_1000 = backend.memory_stats()
    for _ in range(3):
        run_step(backend, [cache], [(0, qkv(1000, 1, gen))])
    at_4000 = backend.memory_stats()
    assert backend.cache_len(cache) == 4000
    assert at_1000["device_bytes"] == at_4000["device_bytes"] > 0
    assert at_1000["device_tokens"] == at_4000["device_tokens"] == 640
    assert at_4000["host_tokens"] == 4000 - 640
    assert at_4000["host_bytes"] > at_1000["host_bytes"]


def streaming_reference(q, k, v, positions, sinks, window):
    """Exact attention of q [T, Hq, D] at `positions` over k, v [L, Hkv, D] (whole history),
    each query restricted to the sinks and its `window` preceding tokens."""
    g = HQ // HKV
    kk = k.double().repeat_interleave(g, 1).transpose(0, 1)  # [Hq, L, D]
    vv = v.double().repeat_interleave(g, 1).transpose(0, 1)
    scores = SCALE * torch.einsum("thd,hld->htl", q.double(), kk)
    j = torch.arange(k.shape[0]).unsqueeze(0)
    p = positions.unsqueeze(1)
    visible = (j <= p) & ((j < sinks) | (j >= p - window))
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,hld->thd", torch.softmax(scores, -1), vv).float()


def test_streaming_equals_sinks_plus_window_attention():
    sinks, window, layers = 8, 32, 2
    backend = TieredAttentionBackend(
        shape(layers), "streaming", sink_tokens=sinks, window_tokens=window
    )
    cache = backend.new_cache()
    gen = torch.Generator().manual_seed(3)
    history = [([], []) for _ in range(layers)]
    for n in [5, 50, 90, 60] + [1] * 20:
        start = backend.cache_len(cache)
        inputs = qkv(n, layers, gen)
        outs = run_step(backend, [cache], [(0, inputs)])[0]
        for layer, (q, k, v) in enumerate(inputs):
            history[layer][0].append(k)
            history[layer][1].append(v)
            ref = streaming_reference(
                q,
                torch.cat(history[layer][0]),
                torch.cat(history[layer][1]),
                torch.arange(start, start + n),
                sinks,
                window,
            )
            torch.testing.assert_close(outs[layer], ref, atol=1e-5, rtol=1e-5)
    stats = backend.memory_stats()
    assert stats["host_bytes"] == stats["host_tokens"] == 0
    assert stats["device_tokens"] == sinks + window


@pytest.mark.parametrize("mode", ["retrieval", "streaming"])
def test_free_returns_memory_to_zero(mode):
    backend = TieredAttentionBackend(shape(2), mode, sink_tokens=16, window_tokens=32, top_k=4)
    gen = torch.Generator().manual_seed(4)
    caches = [backend.new_cache() for _ in range(2)]
    run_step(backend, caches, [(0, qkv(200, 2, gen)), (1, qkv(20, 2, gen))])
    run_step(backend, caches, [(0, qkv(1, 2, gen)), (1, qkv(1, 2, gen))])
    before = backend.memory_stats()
    assert before["device_bytes"] > 0 and before["device_tokens"] == 48 + 21
    short = caches[1]  # shorter than S + W: no host tier, no retriever, no query samples
    assert short.retriever is None and short.host_bytes() == 0
    if mode == "retrieval":
        assert before["host_bytes"] > 0 and before["host_tokens"] == 201 - 48
    for cache in caches:
        backend.free(cache)
    assert backend.memory_stats() == {
        "device_bytes": 0,
        "host_bytes": 0,
        "device_tokens": 0,
        "host_tokens": 0,
    }
    assert all(c.retriever is None and c.host_len == [0, 0] for c in caches)


def test_retrieval_finds_a_dominant_host_key_streaming_misses():
    layers, sinks, window = 1, 4, 16
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(D, generator=gen)
    u = u / u.norm() * D**0.5
    prompt = qkv(300, layers, gen)
    prompt[0][1][100] = 2 * u  # position 100 ends up in the host tier
    query = qkv(1, layers, gen)
    query[0][0][0] = 2 * u

    errors = {}
    full = FullAttentionBackend(shape(layers))
    for name, backend in [
        ("retrieval", TieredAttentionBackend(shape(layers), "retrieval", sinks, window, top_k=4)),
        ("streaming", TieredAttentionBackend(shape(layers), "streaming", sinks, window)),
    ]:
        fc, tc = full.new_cache(), backend.new_cache()
        for inputs in (prompt, query):
            ref = run_step(full, [fc], [(0, inputs)])[0][0]
            got = run_step(backend, [tc], [(0, inputs)])[0][0]
        errors[name] = (got - ref).abs().max().item()
    assert errors["retrieval"] < 0.1 * errors["streaming"]
    assert errors["streaming"] > 0.1


def test_query_samples_are_strided_bounded_and_chunking_invariant():
    def samples(chunks, capacity):
        backend = TieredAttentionBackend(
            shape(1), "retrieval", sink_tokens=8, window_tokens=16, query_sample_size=capacity
        )
        cache = backend.new_cache()
        q, k, v = qkv(sum(chunks), 1, torch.Generator().manual_seed(6))[0]
        start = 0
        for n in chunks:
            run_step(backend, [cache], [(0, [tuple(x[start : start + n] for x in (q, k, v))])])
            start += n
        return cache, q

    cache, queries = samples([300, 450, 250], capacity=64)
    got, pos = cache.query_samples(0), cache.query_sample_positions(0)
    assert got.shape[0] == HQ and 32 < got.shape[1] <= 64
    stride = int(pos[1] - pos[0])
    assert torch.equal(pos, torch.arange(0, 1000, stride))
    assert torch.equal(got, queries[pos].transpose(0, 1))
    other, _ = samples([1000], capacity=64)
    assert torch.equal(other.query_samples(0), got)
    small, queries = samples([40], capacity=64)
    assert torch.equal(small.query_samples(0), queries.transpose(0, 1))


class RecordingRetriever(HostRetriever):
    """Exact search plus a record of every batch of keys added, to check incrementality."""

    def __init__(self, cache: TieredCache) -> None:
        super().__init__()
        self.exact = ExactRetriever(cache)
        self.added: dict[int, list[torch.Tensor]] = {}

    def add(self, layer: int, keys: torch.Tensor) -> None:
        self.added.setdefault(layer, []).append(keys.clone())

    def search(self, layer: int, q: torch.Tensor, k: int) -> torch.Tensor:
        idx = self.exact.search(layer, q, k)
        self.queries, self.scanned, self.candidates = (
            self.exact.queries,
            self.exact.scanned,
            self.exact.candidates,
        )
        return idx


def test_retriever_gets_evicted_keys_incrementally_in_order():
    sinks, window, layers = 4, 8, 2
    backend = TieredAttentionBackend(
        shape(layers),
        "retrieval",
        sink_tokens=sinks,
        window_tokens=window,
        top_k=3,
        retriever_factory=RecordingRetriever,
    )
    cache = backend.new_cache()
    gen = torch.Generator().manual_seed(7)
    keys = [[] for _ in range(layers)]
    for n in [10, 30, 1, 1, 1]:
        inputs = qkv(n, layers, gen)
        for layer in range(layers):
            keys[layer].append(inputs[layer][1])
        run_step(backend, [cache], [(0, inputs)])
    total = 43
    for layer in range(layers):
        added = torch.cat(cache.retriever.added[layer], dim=1)
        expected = torch.cat(keys[layer])[sinks : total - window].transpose(0, 1)
        assert torch.equal(added, expected)
        assert torch.equal(cache.host_keys(layer), expected)
        assert len(cache.retriever.added[layer]) == 4  # one batch per evicting step
    stats = backend.retrieval_stats()
    # Three decode steps, each searching every query head of every layer.
    assert stats["queries"] == 3 * layers * HQ
    assert stats["scanned"] == stats["candidates"] > 0


def test_exact_retriever_returns_top_k_per_head():
    backend = TieredAttentionBackend(shape(1), "retrieval", sink_tokens=2, window_tokens=4)
    cache = backend.new_cache()
    gen = torch.Generator().manual_seed(8)
    run_step(backend, [cache], [(0, qkv(50, 1, gen))])
    q = torch.randn(HQ, D, generator=gen)
    idx = cache.retriever.search(0, q, 5)
    keys = cache.host_keys(0)
    g = HQ // HKV
    for h in range(HQ):
        expected = (keys[h // g] @ q[h]).topk(5).indices
        assert set(idx[h].tolist()) == set(expected.tolist())


def test_device_tokens_for_step():
    backend = TieredAttentionBackend(shape(1), "retrieval", sink_tokens=16, window_tokens=64)
    assert backend.device_tokens_for(10, 10) == 10
    assert backend.device_tokens_for(1001, 1) == 81
    assert backend.device_tokens_for(1500, 500) == 80 + 500


def test_rejects_bad_configuration_and_stale_slices():
    with pytest.raises(ValueError, match="mode"):
        TieredAttentionBackend(shape(1), "full")
    with pytest.raises(ValueError, match="top_k"):
        TieredAttentionBackend(shape(1), top_k=0)
    with pytest.raises(ValueError, match="window_tokens"):
        TieredAttentionBackend(shape(1), window_tokens=0)
    with pytest.raises(ValueError, match="sink_tokens"):
        TieredAttentionBackend(shape(1), sink_tokens=-1)
    backend = TieredAttentionBackend(shape(1))
    cache = backend.new_cache()
    q, k, v = qkv(2, 1, torch.Generator().manual_seed(9))[0]
    ctx = ForwardContext(slices=[SequenceSlice(cache, 0, 2, 5)], backend=backend)
    with pytest.raises(ValueError, match="cached tokens"):
        backend.forward(0, q, k, v, ctx, SCALE)
