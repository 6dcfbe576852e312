"""Tests for retrieval/: every index kind against exact top-k inner-product search."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import (
    INDEX_KINDS,
    BuildJob,
    KeyStore,
    build_indexes,
    create_index,
    exact_topk,
)

DIM = 32

# Search effort at which every approximate kind should be (nearly) exact on small data.
HIGH_EFFORT = {
    "exact": {},
    "faiss-flat": {},
    "faiss-ivf": {"nprobe": 1000},
    "faiss-hnsw": {"ef": 400},
    "hnswlib": {"ef": 400},
    "attention-aware": {"ef": 400},
}


def ood_data(n: int, m: int, t: int, dim: int = DIM, seed: int = 0):
    """Clustered keys; queries mean-shifted away from the keys, as in real attention."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((16, dim)) * 2
    keys = centers[rng.integers(0, 16, n)] + rng.standard_normal((n, dim))
    shift = rng.standard_normal(dim) * 3
    queries = rng.standard_normal((m + t, dim)) * 1.5 + shift
    return keys.astype(np.float32), queries[:m].astype(np.float32), queries[m:].astype(np.float32)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth, strict=True)]))


@pytest.fixture(scope="module")
def small():
    return ood_data(n=600, m=300, t=40)


def build(kind: str, keys, sample, **options):
    index = create_index(kind, DIM, **options)
    index.build(keys, sample)
    index.configure(**HIGH_EFFORT[kind])
    return index


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_high_effort_search_finds_exact_topk(kind, small):
    keys, sample, queries = small
    index = build(kind, keys, sample)
    assert index.size == len(keys)
    truth, truth_scores = exact_topk(keys, queries, 10)
    res = index.search(queries, 10)
    assert res.ids.shape == (len(queries), 10) and res.ids.dtype == np.int64
    r = recall(res.ids, truth)
    if kind in ("exact", "faiss-flat", "faiss-ivf", "attention-aware"):
        # Flat scans are exact; IVF probing every list and a beam as wide as the graph
        # visit every key.
        assert r == 1.0
        np.testing.assert_allclose(res.scores, truth_scores, rtol=1e-4, atol=1e-4)
    else:
        assert r >= 0.95
    # Reported scores are the inner products of the returned keys, best first.
    np.testing.assert_allclose(
        res.scores, np.einsum("bd,bkd->bk", queries, keys[res.ids]), rtol=1e-4, atol=1e-3
    )
    assert np.all(np.diff(res.scores, axis=1) <= 1e-5)
    if kind in ("exact", "faiss-flat", "faiss-ivf"):
        assert np.all(res.scanned == len(keys))
    elif kind == "hnswlib":
        assert np.all(res.scanned == -1)  # hnswlib does not report distance counts
    else:  # the attention-aware index also scores its routing centroids
        routes = len(index._centroids) if kind == "attention-aware" else 0
        assert np.all((res.scanned > 0) & (res.scanned <= len(keys) + routes))


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_add_indexes_new_keys_without_rebuild(kind, small):
    keys, sample, _ = small
    rng = np.random.default_rng(1)
    old, new = keys[:400], keys[400:].copy()
    direction = np.zeros(DIM, dtype=np.float32)
    direction[0] = 1.0
    new[:50] += 12 * direction  # these new keys are the best answers for the queries below
    index = build(kind, old, sample)
    index.add(new[:120])
    index.add(new[120:])
    assert index.size == len(keys)
    queries = (rng.standard_normal((20, DIM)) + 8 * direction).astype(np.float32)
    truth, _ = exact_topk(np.concatenate([old, new]), queries, 10)
    assert np.all(truth >= 400)  # ids continue from the size before the add
    res = index.search(queries, 10)
    assert recall(res.ids, truth) >= 0.95


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_padding_when_fewer_keys_than_k(kind):
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((5, DIM)).astype(np.float32)
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    empty = create_index(kind, DIM)
    res = empty.search(queries, 4)
    assert np.all(res.ids == -1) and np.all(np.isneginf(res.scores))
    index = build(kind, keys, None)
    res = index.search(queries, 8)
    truth, truth_scores = exact_topk(keys, queries, 5)
    np.testing.assert_array_equal(res.ids[:, :5], truth)
    np.testing.assert_allclose(res.scores[:, :5], truth_scores, rtol=1e-5, atol=1e-5)
    assert np.all(res.ids[:, 5:] == -1) and np.all(np.isneginf(res.scores[:, 5:]))


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="attention-aware") as e:
        create_index("annoy", DIM)
    assert "faiss-ivf" in str(e.value)


def test_invalid_inputs_raise_value_errors(small):
    keys, sample, queries = small
    index = build("attention-aware", keys, sample)
    with pytest.raises(ValueError, match="shape"):
        index.search(queries[:, :10], 5)
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="nprobe"):
        index.configure(nprobe=4)
    with pytest.raises(ValueError, match="ef must be"):
        index.configure(ef=0)
    with pytest.raises(ValueError, match="already holds"):
        index.build(keys)
    with pytest.raises(ValueError, match="bad options"):
        create_index("faiss-ivf", DIM, ef=3)
    with pytest.raises(ValueError, match="shape"):
        create_index("exact", DIM).add(np.zeros((3, DIM + 1), dtype=np.float32))
    store = KeyStore(DIM)
    with pytest.raises(ValueError, match="queries"):
        create_index("attention-aware", DIM, store=store).build(keys, sample[:, :5])
    assert store.size == 0  # nothing was stored by the failed build
    with pytest.raises(ValueError, match="guide"):
        create_index("attention-aware", DIM, guide="value")


def test_key_store_grows_and_is_shared_without_copies(small):
    keys, sample, queries = small
    store = KeyStore(DIM, capacity=4)
    exact = create_index("exact", DIM, store=store)
    graph = create_index("attention-aware", DIM, store=store)
    exact.build(keys[:300])
    graph.build(keys[:300], sample)
    exact.add(keys[300:])
    graph.add(keys[300:])
    assert store.size == len(keys)  # one copy for both indexes
    np.testing.assert_array_equal(store.view(), keys)
    assert exact.nbytes == 0  # the shared store is not counted
    assert 0 < graph.nbytes < store.nbytes * 4
    assert not store.view().flags.writeable
    other = create_index("exact", DIM, store=store)
    with pytest.raises(ValueError, match="differ"):
        other.build(keys[::-1].copy())
    # Store-backed and self-contained indexes agree.
    graph.configure(ef=600)
    np.testing.assert_array_equal(graph.search(queries, 5).ids, exact.search(queries, 5).ids)


def test_ivf_scanned_is_the_size_of_the_probed_lists(small):
    keys, sample, queries = small
    index = create_index("faiss-ivf", DIM, nprobe=3)
    index.build(keys)
    index.add(keys[:50])
    ivf = index._index
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    assert sizes.sum() == index.size == len(keys) + 50
    _, lists = ivf.quantizer.search(queries, 3)
    np.testing.assert_array_equal(index.search(queries, 10).scanned, sizes[lists].sum(axis=1))


def test_parallel_build_matches_serial(small):
    keys, sample, queries = small
    kinds = ["exact", "faiss-ivf", "hnswlib", "attention-aware"]

    def make_jobs():
        store = KeyStore(DIM)
        jobs = []
        for head in range(2):
            head_sample = sample[head::2]
            for kind in kinds:
                opts = {"store": store} if kind in ("exact", "attention-aware") else {}
                jobs.append(BuildJob(create_index(kind, DIM, **opts), keys, head_sample))
        return store, jobs

    store_s, serial = make_jobs()
    store_p, parallel = make_jobs()
    build_indexes(serial, num_threads=1, progress=False)
    built = build_indexes(parallel, num_threads=2, progress=False)
    assert [j.index for j in parallel] == built
    assert store_s.size == store_p.size == len(keys)
    for a, b in zip(serial, parallel, strict=True):
        ra, rb = a.index.search(queries, 10), b.index.search(queries, 10)
        np.testing.assert_array_equal(ra.ids, rb.ids)
        np.testing.assert_array_equal(ra.scanned, rb.scanned)


def test_attention_aware_scans_few_keys_on_ood_queries():
    keys, sample, queries = ood_data(n=4000, m=1000, t=100, seed=3)
    truth, _ = exact_topk(keys, queries, 10)
    index = create_index("attention-aware", DIM, ef=32)
    index.build(keys, sample)
    assert index.reachable().all()
    res = index.search(queries, 10)
    assert recall(res.ids, truth) >= 0.9
    assert res.scanned.mean() < 0.2 * len(keys)


def test_attention_aware_add_keeps_every_key_reachable():
    keys, sample, queries = ood_data(n=3000, m=600, t=50, seed=4)
    index = create_index("attention-aware", DIM, ef=64)
    index.build(keys[:1500], sample)
    for lo in range(1500, 3000, 100):
        index.add(keys[lo : lo + 100])
    assert index.size == 3000
    assert index.reachable().all()
    assert index.degrees().max() <= index.degree + index.extra_degree
    truth, _ = exact_topk(keys, queries, 10)
    assert recall(index.search(queries, 10).ids, truth) >= 0.9


def drift_data(n: int, dim: int = DIM, seed: int = 5):
    """Keys and queries following a slowly rotating topic: late queries favour late keys."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(dim), rng.standard_normal(dim)
    t = np.linspace(0, 3 * np.pi, n)[:, None]
    topic = np.cos(t) * a + np.sin(t) * b
    keys = topic + rng.standard_normal((n, dim))
    queries = 1.5 * topic + 0.7 * rng.standard_normal((n, dim)) + 2 * rng.standard_normal(dim)
    return keys.astype(np.float32), queries.astype(np.float32)


def test_attention_aware_add_with_recent_queries():
    keys, queries = drift_data(3000)
    tests = queries[-50:]
    truth, _ = exact_topk(keys, tests, 10)
    assert (truth >= 1500).mean() > 0.2  # the added keys matter to the late queries
    index = create_index("attention-aware", DIM, ef=32)
    index.build(keys[:1500], queries[:1500])
    for lo in range(1500, 3000, 50):
        index.add(keys[lo : lo + 50], queries[lo : lo + 50])
    assert index.reachable().all()
    assert index.degrees().max() <= index.degree + index.extra_degree
    res = index.search(tests, 10)
    assert recall(res.ids, truth) >= 0.9
    assert res.scanned.mean() < 0.3 * len(keys)


def test_attention_aware_search_starts_from_seeds():
    """Seeded with the true top keys, a search on a tight budget returns all of them (the
    unseeded one at the same budget does not); seeds count as scanned, -1 pads, and bad
    seeds are refused."""
    keys, sample, queries = ood_data(n=4000, m=1000, t=50, seed=3)
    truth, _ = exact_topk(keys, queries, 20)
    index = create_index("attention-aware", DIM, ef=20, scan_factor=2)  # budget 40
    index.build(keys, sample)
    cold = index.search(queries, 20)
    padded = np.concatenate([truth, np.full((len(queries), 5), -1)], axis=1)
    warm = index.search(queries, 20, seeds=padded)
    assert recall(cold.ids, truth) < 0.95
    assert recall(warm.ids, truth) == 1.0
    assert (warm.scanned <= 40).all() and (warm.scanned >= 20).all()
    for bad in (truth[:3], truth[:, :, None], np.full_like(truth, len(keys)), truth * 0 - 2):
        with pytest.raises(ValueError, match="seed"):
            index.search(queries, 20, seeds=bad)


@pytest.mark.parametrize("kind", ["exact", "faiss-hnsw", "hnswlib"])
def test_indexes_without_seed_support_ignore_seeds(kind, small):
    keys, sample, queries = small
    index = build(kind, keys, sample)
    seeds = np.zeros((len(queries), 3), dtype=np.int64)
    plain, seeded = index.search(queries, 10), index.search(queries, 10, seeds=seeds)
    assert not index.uses_seeds
    np.testing.assert_array_equal(plain.ids, seeded.ids)
