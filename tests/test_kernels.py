"""Partial attention kernels against float64 references, and the log-sum-exp merge."""

import importlib

import pytest
import torch

from kernels import (
    attention_over_rows,
    batched_partial_attention,
    gather_rows,
    gathered_partial_attention,
    merge_partials,
    partial_attention,
)
from kernels.reference import (
    batched_partial_attention_ref,
    gathered_partial_attention_ref,
    partial_attention_ref,
)

HQ, HKV, D = 6, 2, 16
SCALE = D**-0.5
TOL = dict(atol=1e-5, rtol=1e-5)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_softmax(q, k, v, scale):
    """Plain softmax attention of q [Hq, D] over k, v [Hkv, L, D] (float64)."""
    g = q.shape[0] // k.shape[0]
    kk = k.double().repeat_interleave(g, 0)
    vv = v.double().repeat_interleave(g, 0)
    scores = scale * torch.einsum("hd,hld->hl", q.double(), kk)
    return torch.einsum("hl,hld->hd", torch.softmax(scores, -1), vv), torch.logsumexp(scores, -1)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("causal_offset", [None, 0, 7])
def test_partial_attention_matches_reference(fused, causal_offset):
    t, length = 5, 12
    q, k, v = rand(t, HQ, D, seed=1), rand(HKV, length, D, seed=2), rand(HKV, length, D, seed=3)
    out, lse = partial_attention(q, k, v, SCALE, causal_offset=causal_offset, fused=fused)
    ref_out, ref_lse = partial_attention_ref(q, k, v, SCALE, causal_offset=causal_offset)
    assert out.dtype == torch.float32 and out.shape == (t, HQ, D) and lse.shape == (t, HQ)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)


@pytest.mark.parametrize("fused", [False, True])
def test_partial_attention_mask_and_blind_queries(fused):
    t, length = 4, 9
    q, k, v = rand(t, HQ, D, seed=4), rand(HKV, length, D, seed=5), rand(HKV, length, D, seed=6)
    mask = rand(t, length, seed=7) > 0
    mask[2] = False  # this query sees nothing
    out, lse = partial_attention(q, k, v, SCALE, causal_offset=5, mask=mask, fused=fused)
    ref_out, ref_lse = partial_attention_ref(q, k, v, SCALE, causal_offset=5, mask=mask)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    assert torch.all(lse[2] == float("-inf")) and torch.all(out[2] == 0)


def test_partial_attention_key_blocks_merge_exactly(monkeypatch):
    # Force several key blocks in the unfused path.
    # (The package re-exports the function under the module's name, hence import_module.)
    monkeypatch.setattr(importlib.import_module("kernels.partial_attention"), "_SCORE_BUDGET", 1)
    t, length = 3, 700
    q, k, v = rand(t, HQ, D, seed=8), rand(HKV, length, D, seed=9), rand(HKV, length, D, seed=10)
    out, lse = partial_attention(q, k, v, SCALE, causal_offset=length - t, fused=False)
    ref_out, ref_lse = partial_attention_ref(q, k, v, SCALE, causal_offset=length - t)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)


def test_partial_attention_bfloat16_inputs_give_float32():
    q, k, v = rand(2, HQ, D, seed=11), rand(HKV, 8, D, seed=12), rand(HKV, 8, D, seed=13)
    out, lse = partial_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), SCALE)
    ref_out, ref_lse = partial_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), SCALE)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)


def test_partial_attention_empty_block():
    q = rand(3, HQ, D)
    out, lse = partial_attention(q, torch.empty(HKV, 0, D), torch.empty(HKV, 0, D), SCALE)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_partial_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of KV heads"):
        partial_attention(rand(1, 5, D), rand(2, 4, D), rand(2, 4, D), SCALE)
    with pytest.raises(ValueError, match="expected q"):
        partial_attention(rand(5, D), rand(2, 4, D), rand(2, 4, D), SCALE)
    with pytest.raises(ValueError, match="mask must be bool"):
        partial_attention(rand(1, HQ, D), rand(HKV, 4, D), rand(HKV, 4, D), SCALE, mask=rand(1, 4))


def test_batched_partial_attention_matches_reference():
    b, length = 4, 10
    q, k, v = rand(b, HQ, D, seed=14), rand(b, HKV, length, D, seed=15), rand(b, HKV, length, D)
    key_mask = torch.arange(length).unsqueeze(0) < torch.tensor([[10], [3], [0], [7]])
    out, lse = batched_partial_attention(q, k, v, SCALE, key_mask)
    ref_out, ref_lse = batched_partial_attention_ref(q, k, v, SCALE, key_mask)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    assert torch.all(lse[2] == float("-inf"))


@pytest.mark.parametrize("batched", [False, True])
def test_gathered_partial_attention_matches_reference(batched):
    n, top = 30, 7
    k_store, v_store = rand(HKV, n, D, seed=16), rand(HKV, n, D, seed=17)
    shape = (3, HQ) if batched else (HQ,)
    q = rand(*shape, D, seed=18)
    idx = torch.randint(0, n, (*shape, top), generator=torch.Generator().manual_seed(19))
    idx[..., -2:] = -1  # padding
    out, lse = gathered_partial_attention(q, k_store, v_store, idx, SCALE)
    ref_out, ref_lse = gathered_partial_attention_ref(q, k_store, v_store, idx, SCALE)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)


def test_gathered_padding_is_ignored_and_all_padding_is_empty():
    n = 20
    k_store, v_store = rand(HKV, n, D, seed=20), rand(HKV, n, D, seed=21)
    q = rand(HQ, D, seed=22)
    idx = torch.arange(5).repeat(HQ, 1)
    padded = torch.cat([idx, torch.full((HQ, 4), -1)], dim=1)
    o1, l1 = gathered_partial_attention(q, k_store, v_store, idx, SCALE)
    o2, l2 = gathered_partial_attention(q, k_store, v_store, padded, SCALE)
    torch.testing.assert_close(o1, o2, **TOL)
    torch.testing.assert_close(l1, l2, **TOL)
    o3, l3 = gathered_partial_attention(q, k_store, v_store, torch.full((HQ, 3), -1), SCALE)
    assert torch.all(o3 == 0) and torch.all(l3 == float("-inf"))


def test_gathered_rejects_out_of_range_rows():
    k_store = rand(HKV, 4, D)
    with pytest.raises(ValueError, match="out of range"):
        gathered_partial_attention(rand(HQ, D), k_store, k_store, torch.full((HQ, 2), 4), SCALE)


@pytest.mark.parametrize("layout", ["contiguous", "prefix_of_buffer", "strided"])
def test_gather_rows_reads_each_heads_kv_group(layout):
    buf = torch.arange(HKV * 8 * D, dtype=torch.float32).view(HKV, 8, D)
    if layout == "contiguous":
        k_store = buf[:, :5].contiguous()
    elif layout == "prefix_of_buffer":
        k_store = buf[:, :5]
    else:
        k_store = buf.transpose(1, 2).contiguous().transpose(1, 2)[:, :5]  # D not innermost
    idx = torch.tensor([[0], [1], [2], [3], [4], [0]])
    k_rows, _, valid = gather_rows(k_store, k_store, idx, HQ)
    g = HQ // HKV
    for h in range(HQ):
        assert torch.equal(k_rows[h, 0], k_store[h // g, idx[h, 0]])
    assert valid.all()


def test_merge_of_two_parts_equals_softmax_over_union():
    length = 40
    q = rand(HQ, D, seed=23)
    k, v = rand(HKV, length, D, seed=24), rand(HKV, length, D, seed=25)
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(26))
    a, b = perm[:13], perm[13:]
    o1, l1 = partial_attention(q.unsqueeze(0), k[:, a], v[:, a], SCALE)
    # The second part through the gathered path: same rows for every head of a group.
    idx = b.repeat(HQ, 1)
    o2, l2 = gathered_partial_attention(q, k, v, idx, SCALE)
    out, lse = merge_partials(o1[0], l1[0], o2, l2)
    ref_out, ref_lse = full_softmax(q, k, v, SCALE)
    torch.testing.assert_close(out, ref_out.float(), **TOL)
    torch.testing.assert_close(lse, ref_lse.float(), **TOL)


def test_merge_with_empty_parts():
    o = rand(3, HQ, D, seed=27)
    lse = rand(3, HQ, seed=28)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    out, out_lse = merge_partials(o, lse, empty_o, empty_lse)
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(out_lse, lse)
    out, out_lse = merge_partials(empty_o, empty_lse, o, lse)
    torch.testing.assert_close(out, o)
    out, out_lse = merge_partials(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.all(out == 0) and torch.all(out_lse == float("-inf"))
    assert not torch.isnan(out).any()


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        merge_partials(rand(2, D), rand(2), rand(3, D), rand(3))


def test_attention_over_rows_with_equal_rows_matches_block_attention():
    length = 11
    q = rand(2, HQ, D, seed=29)
    k, v = rand(2, HKV, length, D, seed=30), rand(2, HKV, length, D, seed=31)
    g = HQ // HKV
    k_rows = k.repeat_interleave(g, 1)  # [2, Hq, L, D]
    v_rows = v.repeat_interleave(g, 1)
    out, lse = attention_over_rows(q, k_rows, v_rows, SCALE)
    ref_out, ref_lse = batched_partial_attention(q, k, v, SCALE)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)


# (query heads, KV heads, head dim): GQA groups of 3 (the default model's), 1 (MHA), 4
# and 7 (three heads at a time, then one at a time); head dims with their own unrolled
# code (64, 128) and without (16).
DECODE_SHAPES = [(6, 2, 16), (9, 3, 64), (4, 4, 16), (8, 2, 128), (14, 2, 16)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("append", [True, False])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "hq{}-hkv{}-d{}".format(*s))
def test_decode_attention_appends_and_matches_softmax(
    dtype, tol, threads, append, shape, monkeypatch
):
    """Ragged lengths, spare capacity, frozen segments before the own buffer, the batch
    split across threads or not, several head shapes: with `append` each sequence's new
    row lands in its own buffer at its length (else the buffers are untouched), and its
    output and lse are softmax attention over the rows of its own segments only."""
    import numpy as np

    import kernels.decode_attention as module
    import kernels.thread_split as split
    from kernels.decode_attention import decode_attention

    hq, hkv, d = shape
    scale = d**-0.5
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(split, "SPLIT_WORK", threads > 1)
    monkeypatch.setattr(module, "MIN_ROWS_PER_THREAD", 1)  # split (sequence, head) units
    # per sequence: (capacity, rows attended) of each segment; the last is the own buffer
    layout = [[(4, 1)], [(9, 7)], [(5, 5), (3, 3), (40, 33)], [(2, 2)], [(64, 64)]]
    layout.append([(6, 6), (11, 1)])

    def buffer(capacity: int, seed: int) -> torch.Tensor:
        return rand(hkv, capacity, d, seed=seed).to(dtype)

    segs = [
        [(buffer(c, 100 * b + i), buffer(c, 100 * b + 50 + i), n) for i, (c, n) in enumerate(seq)]
        for b, seq in enumerate(layout)
    ]
    flat = [seg for seq in segs for seg in seq]
    batch = len(segs)
    q = rand(batch, hq, d, seed=1).to(dtype)
    k_new, v_new = rand(batch, hkv, d, seed=2).to(dtype), rand(batch, hkv, d, seed=3).to(dtype)
    before = [(k.clone(), v.clone()) for k, v, _ in flat]
    layout_args = (
        np.cumsum([0] + [len(seq) for seq in segs]).astype(np.int64),
        np.array([k.data_ptr() for k, _, _ in flat], dtype=np.int64),
        np.array([v.data_ptr() for _, v, _ in flat], dtype=np.int64),
        np.array([k.shape[1] * d for k, _, _ in flat], dtype=np.int64),
        np.array([n for _, _, n in flat], dtype=np.int64),
        scale,
    )
    out, lse = decode_attention(q, k_new, v_new, *layout_args, append=append)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == q.shape
    # the output in q's dtype: the float32 result rounded once (a second append writes
    # the same row again)
    same, same_lse = decode_attention(q, k_new, v_new, *layout_args, append, out_dtype=dtype)
    assert same.dtype == dtype and torch.equal(same, out.to(dtype)) and torch.equal(same_lse, lse)
    for b, seq in enumerate(segs):
        own_k, own_v, n = seq[-1]
        if append:
            assert torch.equal(own_k[:, n - 1], k_new[b]) and torch.equal(own_v[:, n - 1], v_new[b])
        keys = torch.cat([k[:, :m] for k, _, m in seq], 1).float()
        values = torch.cat([v[:, :m] for _, v, m in seq], 1).float()
        want, want_lse = full_softmax(q[b].float(), keys, values, scale)
        torch.testing.assert_close(out[b].double(), want, atol=tol, rtol=tol)
        torch.testing.assert_close(lse[b].double(), want_lse, atol=tol, rtol=tol)
    if not append:
        for (k, v, _), (k0, v0) in zip(flat, before, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)


def test_decode_attention_rejects_other_dtypes():
    import numpy as np

    from kernels.decode_attention import decode_attention

    one = np.zeros(1, dtype=np.int64)
    q = torch.zeros(1, HQ, D, dtype=torch.float64)
    kv = torch.zeros(1, HKV, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        decode_attention(q, kv, kv, np.array([0, 1]), one, one, one, one + 1, SCALE)


def test_decode_attention_exp_matches_libm_over_softmax_range():
    """The kernel's vectorisable exp: relative error below 1e-6 from 0 down to -87, and
    scores further below the maximum give a tiny positive weight, never 0/0 or inf."""
    import numpy as np

    from kernels.decode_attention import _exp_nonpositive

    x = np.concatenate([np.linspace(-87.0, 0.0, 200_001), [-88.0, -1e4]]).astype(np.float32)
    got = x.copy()
    _exp_nonpositive(got, len(got), np.empty(len(got), np.int32))
    want = np.exp(np.maximum(x.astype(np.float64), -87.0))
    assert np.all(np.abs(got / want - 1.0) < 1e-6)
    assert np.all(np.isfinite(got)) and np.all(got > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv", [(9, 3), (4, 4)])
def test_score_keys_reads_each_heads_rows_in_place(dtype, hq, hkv):
    """Scores against host keys that are a view of a larger buffer (the tiered cache's
    layout): each query head against its GQA group's KV head, in float32."""
    from kernels.decode_attention import score_keys

    gen = torch.Generator().manual_seed(hq)
    buffer = torch.randn(hkv, 700, 64, generator=gen).to(dtype)
    keys = buffer[:, :500]
    q = torch.randn(hq, 64, generator=gen)
    got = score_keys(q, keys)
    group = hq // hkv
    want = torch.einsum("hgd,hnd->hgn", q.double().view(hkv, group, 64), keys.double()).reshape(
        hq, 500
    )
    assert got.dtype == torch.float32 and got.shape == (hq, 500)
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()
    assert score_keys(q, buffer[:, :0]).shape == (hq, 0)
    with pytest.raises(ValueError, match="contiguous rows"):
        score_keys(q, buffer.transpose(1, 2))


def test_decode_split_needs_two_units_a_thread(monkeypatch):
    """One sequence's 3 KV heads stay on one thread (two threads could only share them
    2:1, slower than one, measured); two sequences' 6 split in two; few rows stay whole."""
    import numpy as np

    import kernels.thread_split as split
    from kernels.decode_attention import split_units

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(split, "SPLIT_WORK", True)
    one = split_units(np.array([0, 1]), np.array([8192]), 3)
    two = split_units(np.array([0, 1, 2]), np.array([8192, 8192]), 3)
    short = split_units(np.array([0, 1, 2]), np.array([100, 100]), 3)
    assert one == [0, 3] and two == [0, 3, 6] and short == [0, 6]
