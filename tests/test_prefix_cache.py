"""The document (prefix) cache: same answers as without it, copy-on-write sharing, keys
that keep adapters apart, eviction within the byte limit, metrics, preemption, abort.

Engine tests use the tiny 2-layer model (fp32); greedy tokens must be identical with and
without the cache and logprobs within 1e-4 (the cached path only changes the order in
which attention partials are summed).
"""

from __future__ import annotations

import httpx
import pytest
import torch

from engine.attention_backend import CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.llm_engine import EngineConfig, LLMEngine
from engine.lofit_adapter import LofitAdapter, save_adapter
from engine.prefix_cache import BLOCK_TOKENS, prefix_boundary
from engine.sampling_params import SamplingParams
from engine.tiered_attention import TieredAttentionBackend
from tests.support.server_process import ServerProcess

TIERS = {"sink_tokens": 32, "window_tokens": 128, "top_k": 16, "max_num_batched_tokens": 512}


def _engine(model_dir, **overrides) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), **{**TIERS, **overrides}))


def _tokens(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (length,), generator=gen).tolist()


def _params(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=3)


def _run(engine: LLMEngine, requests: dict[str, tuple], params=None) -> dict[str, tuple]:
    """Add every request (id -> (prompt, lofit)) at once, run to completion; returns
    id -> (token ids, logprobs, text)."""
    params = params or _params()
    for rid, (prompt, lofit) in requests.items():
        engine.add_request(rid, prompt, params, lofit=lofit)
    return _drain(engine)


def _drain(engine: LLMEngine, results: dict | None = None, steps: int | None = None) -> dict:
    """Step until nothing is left (or `steps` times), collecting every request's output."""
    results = {} if results is None else results
    while engine.has_unfinished() and steps != 0:
        for out in engine.step():
            tokens, logprobs, text = results.get(out.request_id, ([], [], ""))
            results[out.request_id] = (
                tokens + out.token_ids,
                logprobs + out.logprobs,
                text + out.text,
            )
        steps = None if steps is None else steps - 1
    return results


def _assert_same(got, want, tol: float = 1e-4) -> None:
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top, strict=True)) < tol


# -- backends: children of a snapshot are copy-on-write --------------------------------------

SHAPE = CacheShape(num_layers=2, num_kv_heads=2, head_dim=16)


def _qkv(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, h, 16, generator=g) for h in (4, 2, 2))


def _step(backend, work):
    """One packed step over [(cache, (q, k, v))]; per cache, the outputs of each layer."""
    slices, start = [], 0
    for cache, (q, _, _) in work:
        slices.append(SequenceSlice(cache, start, q.shape[0], backend.cache_len(cache)))
        start += q.shape[0]
    ctx = ForwardContext(slices, backend)
    packed = [torch.cat([x[j] for _, x in work]) for j in range(3)]
    outs = [backend.forward(layer, *packed, ctx, 0.25) for layer in range(SHAPE.num_layers)]
    return [[o[s.start : s.end] for o in outs] for s in slices]


def _continuation(seed: int):
    """A prefill chunk, then three decode steps."""
    return [_qkv(7, seed), _qkv(1, seed + 1), _qkv(1, seed + 2), _qkv(1, seed + 3)]


def _fresh(backend, steps):
    """Outputs of a new cache fed `steps` one by one (the reference)."""
    cache = backend.new_cache()
    outs = [_step(backend, [(cache, x)])[0] for x in steps]
    backend.free(cache)
    return outs


@pytest.mark.parametrize(
    "make",
    [
        lambda: FullAttentionBackend(SHAPE),
        lambda: TieredAttentionBackend(SHAPE, "retrieval", sink_tokens=4, window_tokens=8, top_k=6),
        lambda: TieredAttentionBackend(SHAPE, "streaming", sink_tokens=4, window_tokens=8),
    ],
    ids=["full", "retrieval", "streaming"],
)
def test_children_of_a_snapshot_never_see_each_others_tokens(make):
    backend = make()
    prefix = [_qkv(40, 0)]
    parent = backend.new_cache()
    _step(backend, [(parent, prefix[0])])
    snapshot = backend.freeze(parent)  # the parent goes on as a child
    children = [parent, backend.child(snapshot), backend.child(snapshot)]
    conts = [_continuation(10 * i + 1) for i in range(3)]
    got = [[] for _ in children]
    for step in range(4):  # all three in one batch: prefill chunks, then batched decodes
        outs = _step(backend, [(c, cont[step]) for c, cont in zip(children, conts, strict=True)])
        for i, out in enumerate(outs):
            got[i].append(out)
    for i, cont in enumerate(conts):
        want = _fresh(backend, prefix + cont)[1:]
        for g_step, w_step in zip(got[i], want, strict=True):
            for g, w in zip(g_step, w_step, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

    # The snapshot is unchanged: a late child sees the prefix only; and a snapshot of a
    # child (a chain) serves its own children correctly.
    late = backend.child(snapshot)
    late_out = [_step(backend, [(late, x)])[0] for x in conts[1]]
    deeper = backend.freeze(children[1])
    grandchild = backend.child(deeper)
    tail = _continuation(99)
    deep_out = [_step(backend, [(grandchild, x)])[0] for x in tail]
    for got_steps, want in (
        (late_out, _fresh(backend, prefix + conts[1])[1:]),
        (deep_out, _fresh(backend, prefix + conts[1] + tail)[5:]),
    ):
        for g_step, w_step in zip(got_steps, want, strict=True):
            for g, w in zip(g_step, w_step, strict=True):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

    for cache in children + [late, grandchild]:
        backend.free(cache)
    assert all(v == 0 for v in backend.memory_stats().values())
    assert snapshot.nbytes() > 0 and deeper.nbytes() > 0
    backend.release_snapshot(deeper)
    backend.release_snapshot(snapshot)
    assert snapshot.nbytes() == 0


@pytest.mark.parametrize("mode", ["full", "retrieval"])
def test_a_planned_freeze_moves_the_buffers_instead_of_copying(mode):
    if mode == "full":
        backend = FullAttentionBackend(SHAPE)
    else:
        backend = TieredAttentionBackend(SHAPE, mode, sink_tokens=4, window_tokens=8)
    cache = backend.new_cache()
    backend.plan_freeze(cache, 40)
    _step(backend, [(cache, _qkv(40, 0))])
    before = cache.k[0].data_ptr() if mode == "full" else cache.host_k[0].data_ptr()
    assert backend.freeze_nbytes(cache) > 0
    snapshot = backend.freeze(cache)
    after = snapshot.own.k[0] if mode == "full" else snapshot.own.host_k[0]
    assert after.data_ptr() == before and after.shape[1] == (40 if mode == "full" else 28)
    backend.free(cache)
    backend.release_snapshot(snapshot)


def test_boundaries_leave_a_suffix_of_at_least_two_tokens():
    assert prefix_boundary(BLOCK_TOKENS + 1) == 0
    assert prefix_boundary(BLOCK_TOKENS + 2) == BLOCK_TOKENS
    assert prefix_boundary(3 * BLOCK_TOKENS + 1) == 2 * BLOCK_TOKENS


# -- the engine: same answers, with hits --------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "retrieval", "streaming"])
def test_answers_match_the_cache_off_engine(tiny_model_dir, attention):
    doc, follow_up = _tokens(600, 1), _tokens(300, 5)
    prompts = {
        "a": doc + _tokens(30, 2),
        "b": doc + _tokens(25, 3),
        "c": doc + _tokens(35, 4),
        "d": doc + follow_up + _tokens(20, 6),
        "e": doc + follow_up + _tokens(22, 7),
    }
    on = _engine(tiny_model_dir, attention=attention)
    got = _run(on, {"a": (prompts["a"], None)})  # prefills all, snapshots at 256 and 512
    got |= _run(on, {r: (prompts[r], None) for r in "bc"})  # two children at once
    got |= _run(on, {"d": (prompts["d"], None)})  # hits 512, snapshots a chain at 768
    got |= _run(on, {"e": (prompts["e"], None)})  # hits the chain
    off = _engine(tiny_model_dir, attention=attention, prefix_cache_bytes=0)
    want = {r: _run(off, {r: (p, None)})[r] for r, p in prompts.items()}
    for rid in prompts:
        _assert_same(got[rid], want[rid])
    stats = on.prefix_cache.stats()
    assert stats["hits"] == 4 and stats["hit_tokens"] == 3 * 512 + 768
    assert stats["entries"] == 3 and stats["bytes"] == on.memory_stats()["prefix_cache_bytes"] > 0
    assert off.prefix_cache.stats()["queries"] == off.prefix_cache.stats()["bytes"] == 0
    live = on.memory_stats()
    assert live["device_bytes"] == live["host_bytes"] == 0  # finished: only the cache holds


def test_a_shared_boundary_is_snapshotted_after_one_miss(tiny_model_dir):
    """Questions longer than a block: the first snapshots lie past the shared document,
    so the second request misses, but snapshots where the two prompts part."""
    doc = _tokens(900, 71)
    prompts = {f"q{i}": doc + _tokens(400 + i, 72 + i) for i in range(4)}
    on = _engine(tiny_model_dir)
    off = _engine(tiny_model_dir, prefix_cache_bytes=0)
    lengths = []
    for rid, prompt in prompts.items():
        before = on.prefix_cache.stats()["hit_tokens"]
        _assert_same(_run(on, {rid: (prompt, None)})[rid], _run(off, {rid: (prompt, None)})[rid])
        lengths.append(on.prefix_cache.stats()["hit_tokens"] - before)
    assert lengths == [0, 0, 768, 768]  # the document's last full block ends at 768


def _adapter(seed: int) -> LofitAdapter:
    gen = torch.Generator().manual_seed(seed)
    heads = [(0, 1), (1, 2)]
    return LofitAdapter(
        "tiny", heads, 0.5 * torch.randn(2, 16, generator=gen), torch.randn(2, 16, generator=gen)
    )


def test_different_adapters_never_share_kv(tiny_model_dir, tmp_path):
    engines = [_engine(tiny_model_dir), _engine(tiny_model_dir, prefix_cache_bytes=0)]
    for i, name in enumerate(("alpha", "beta")):
        save_adapter(_adapter(40 + i), tmp_path / name)
        for engine in engines:
            engine.load_lofit(name, str(tmp_path / name))
    on, off = engines
    doc = _tokens(700, 11)
    requests = {
        "alpha-1": (doc + _tokens(20, 12), "alpha"),
        "beta": (doc + _tokens(20, 13), "beta"),
        "none": (doc + _tokens(20, 14), None),
        "alpha-2": (doc + _tokens(20, 15), "alpha"),
    }
    params = _params(max_tokens=16)
    got: dict[str, tuple] = {}

    def add(rid: str) -> None:
        prompt, lofit = requests[rid]
        on.add_request(rid, prompt, params, lofit=lofit)
        _drain(on, got, steps=1)  # allocated (looked up) in this step
        assert not on._requests["alpha-1"][0].finished  # it runs alongside alpha-1

    on.add_request("alpha-1", requests["alpha-1"][0], params, lofit="alpha")
    while not on.prefix_cache.stats()["entries"]:  # alpha-1 snapshots its document
        _drain(on, got, steps=1)
    add("beta")
    add("none")
    assert on.prefix_cache.stats()["hits"] == 0  # same document, other adapters: no hit
    add("alpha-2")
    assert on.prefix_cache.stats()["hits"] == 1  # same adapter: hit
    _drain(on, got)
    for rid, request in requests.items():
        _assert_same(got[rid], _run(off, {rid: request}, params)[rid])
    assert on.prefix_cache.stats()["entries"] == 6  # two (256, 512) per adapter and none
    on.unload_lofit("beta")  # the name may be reused for other weights: its KV goes
    assert on.prefix_cache.stats()["entries"] == 4


def test_anchored_bias_correction_never_shares_kv_with_plain_requests(tiny_model_dir):
    from engine.bias_profile import BiasProfile

    gen = torch.Generator().manual_seed(7)
    profile = BiasProfile(
        base_model="tiny",
        letters=["A", "B"],
        letter_token_ids=[32, 33],
        neurons=[(0, 5), (1, 7)],
        neuron_scales=torch.tensor([0.25, 3.0]),
        heads=[(0, 1)],
        head_offsets=torch.randn(1, 16, generator=gen),
        prior=torch.tensor([0.6, 0.4]),
    )
    on, off = _engine(tiny_model_dir), _engine(tiny_model_dir, prefix_cache_bytes=0)
    for engine in (on, off):
        engine.bias.register("p", profile)
    doc = _tokens(700, 17)
    params = _params()
    order = [(None, 0), ("anchored:p", 0), ("anchored:p", 1), ("prior:p", 2)]  # hits so far
    for i, (bias, hits) in enumerate(order):
        prompt = doc + _tokens(20, 80 + i)
        for engine in (on, off):
            engine.add_request(f"r{i}", prompt, params, bias_correction=bias)
        got, want = _drain(on)[f"r{i}"], _drain(off)[f"r{i}"]
        _assert_same(got, want)
        # anchored changes every position's activations: it never reuses plain KV, only
        # its own; prior only moves the letters' logits, so it may reuse plain KV
        assert on.prefix_cache.stats()["hits"] == hits, (bias, hits)


def test_preempted_sequences_look_up_again_and_stay_correct(tiny_model_dir):
    doc = _tokens(600, 21)
    prompts = {f"r{i}": doc + _tokens(30 + i, 30 + i) for i in range(5)}
    params = _params(max_tokens=24)
    off = _engine(tiny_model_dir, prefix_cache_bytes=0)
    want = {rid: _run(off, {rid: (p, None)}, params)[rid] for rid, p in prompts.items()}

    budget = 3 * 640 + 5  # full mode counts every token: three sequences and a bit
    on = _engine(tiny_model_dir, max_device_tokens=budget)
    got = _run(on, {"r0": (prompts["r0"], None)}, params)
    seqs = []
    for rid in list(prompts)[1:]:
        on.add_request(rid, prompts[rid], params)
        seqs += on._requests[rid]
        got[rid] = ([], [])
    while on.has_unfinished():
        for out in on.step():
            got[out.request_id][0].extend(out.token_ids)
            got[out.request_id][1].extend(out.logprobs)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert on.prefix_cache.stats()["hits"] > 4  # a preempted sequence hit again
    for rid in prompts:
        _assert_same(got[rid], want[rid])


@pytest.mark.parametrize("attention", ["full", "retrieval"])
def test_abort_mid_prefill_leaks_nothing(tiny_model_dir, attention):
    engine = _engine(tiny_model_dir, attention=attention, max_num_batched_tokens=256)
    baseline = engine.memory_stats()
    prompt = _tokens(1400, 41)  # snapshot boundary 1280
    longer = prompt + _tokens(600, 42)  # hits 1280, then has 720 tokens to prefill

    def live() -> dict[str, int]:
        stats = engine.memory_stats()
        return {k: v for k, v in stats.items() if k != "prefix_cache_bytes"}

    def entries_referenced() -> int:
        """References held by sequences (the rest are held by entries extending them)."""
        entries = engine.prefix_cache._entries.values()
        return sum(e.refs for e in entries) - sum(e.parent is not None for e in entries)

    for rid, tokens, steps in (
        ("before-snapshot", prompt, 2),
        ("after-snapshot", prompt, 5),
        ("hit", longer, 1),
    ):
        engine.add_request(rid, tokens, _params())
        for _ in range(steps):
            engine.step()
        seq = engine._requests[rid][0]
        assert 0 < seq.num_computed < len(tokens) - 1  # still prefilling
        engine.abort(rid)
        assert live() == {k: v for k, v in baseline.items() if k != "prefix_cache_bytes"}
        assert entries_referenced() == 0
        held = engine.memory_stats()["prefix_cache_bytes"]
        assert held == engine.prefix_cache.stats()["bytes"]
        assert (held > 0) == (rid != "before-snapshot")
    assert engine.prefix_cache.stats()["hits"] == 1


# -- the server: eviction within the limit, metrics ----------------------------------------------


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("longserve:prefix_cache")
    }


def test_server_evicts_within_the_limit_and_keeps_answering(tiny_model_dir):
    # Full mode holds 2 layers x 2 KV heads x 16 dims x 2 (K, V) x 4 bytes = 512 B a token:
    # one document's snapshots (at 768 and 1024 tokens) fit in 700 KiB, two do not.
    limit = 700 * 1024
    docs = {"A": _tokens(1100, 51), "B": _tokens(1100, 52)}
    order = [("A", 1), ("A", 2), ("B", 1), ("A", 3)]
    prompts = [docs[d] + _tokens(20, 60 + q) for d, q in order]
    off = _engine(tiny_model_dir, max_num_batched_tokens=1024, prefix_cache_bytes=0)
    want = [_run(off, {"r": (p, None)})["r"][2] for p in prompts]
    with ServerProcess(
        str(tiny_model_dir), "--served-model-name", "tiny", "--prefix-cache-bytes", "700KiB"
    ) as server:
        for prompt, text in zip(prompts, want, strict=True):
            body = {
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "logprobs": 1,
            }
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == text
            assert _metrics(server.url)["longserve:prefix_cache_bytes"] <= limit
        m = _metrics(server.url)
    assert m["longserve:prefix_cache_queries_total"] == 4
    assert m["longserve:prefix_cache_query_tokens_total"] == sum(len(p) for p in prompts)
    assert m["longserve:prefix_cache_hits_total"] == 1  # A, A (hit), B (evicts A), A (evicts B)
    assert m["longserve:prefix_cache_hit_tokens_total"] == 1024
    assert m["longserve:prefix_cache_evictions_total"] == 4
    assert m["longserve:prefix_cache_entries"] == 2
    assert m["longserve:prefix_cache_bytes"] == 1024 * 512


def test_cli_flags_and_environment(monkeypatch):
    from server.cli import _engine_config, build_parser, parse_bytes

    assert parse_bytes("2GiB") == 2 << 30 and parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1048576") == 1 << 20
    for bad in ("-1", "lots", "5XB"):
        with pytest.raises(ValueError, match="byte size"):
            parse_bytes(bad)
    parse = build_parser().parse_args
    assert _engine_config(parse(["serve"])).prefix_cache_bytes == 2 << 30
    assert _engine_config(parse(["serve", "--prefix-cache-bytes", "1MiB"])).prefix_cache_bytes == (
        1 << 20
    )
    assert _engine_config(parse(["serve", "--no-prefix-cache"])).prefix_cache_bytes == 0
    monkeypatch.setenv("LONGSERVE_PREFIX_CACHE_BYTES", "3k")
    assert _engine_config(build_parser().parse_args(["serve"])).prefix_cache_bytes == 3000
    monkeypatch.setenv("LONGSERVE_NO_PREFIX_CACHE", "1")
    assert _engine_config(build_parser().parse_args(["serve"])).prefix_cache_bytes == 0
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        EngineConfig(prefix_cache_bytes=-1).validate()
