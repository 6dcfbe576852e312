"""The fused retrieval decode kernel against a float64 reference: device rows plus each
query head's exact top-k host rows, in one softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.retrieval_decode import retrieval_decode_attention

D = 64


def _buffer(hkv: int, capacity: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(hkv, capacity, D, generator=gen).to(dtype)


def _segments(bufs: list[list[tuple[torch.Tensor, torch.Tensor, int]]]):
    """(start, k_addr, v_addr, stride, length) for per-sequence lists of (k, v, rows)."""
    start, k_addr, v_addr, stride, length = [0], [], [], [], []
    for parts in bufs:
        for k, v, n in parts:
            k_addr.append(k.data_ptr())
            v_addr.append(v.data_ptr())
            stride.append(k.stride(0))
            length.append(n)
        start.append(len(length))
    as_i64 = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return tuple(as_i64(x) for x in (start, k_addr, v_addr, stride, length))


def _reference(q, dev_parts, host_parts, hkv, top_k, scale):
    """float64 out [Hq, D] and lse [Hq] for one sequence."""
    hq = q.shape[0]
    group = hq // hkv
    out, lse = torch.empty(hq, D, dtype=torch.float64), torch.empty(hq, dtype=torch.float64)
    for head in range(hq):
        h = head // group
        qh = q[head].double() * scale
        dk = torch.cat([k[h, :n].double() for k, _, n in dev_parts])
        dv = torch.cat([v[h, :n].double() for _, v, n in dev_parts])
        scores, values = dk @ qh, dv
        if host_parts and sum(n for _, _, n in host_parts):
            hk = torch.cat([k[h, :n].double() for k, _, n in host_parts])
            hv = torch.cat([v[h, :n].double() for _, v, n in host_parts])
            host_scores = hk @ qh
            top = host_scores.topk(min(top_k, len(host_scores))).indices
            scores = torch.cat([scores, host_scores[top]])
            values = torch.cat([values, hv[top]])
        p = torch.softmax(scores, 0)
        out[head] = p @ values
        lse[head] = torch.logsumexp(scores, 0)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv"), [(9, 3), (4, 4)])
def test_matches_device_rows_plus_exact_top_k_host_rows(dtype, hq, hkv) -> None:
    gen = torch.Generator().manual_seed(11)
    top_k = 20
    # Sequence 0: two device segments, a shared and an own host segment.
    # Sequence 1: no host rows. Sequence 2: fewer host rows than top_k.
    dev = [
        [(_buffer(hkv, 48, dtype, gen), _buffer(hkv, 48, dtype, gen), 40)]
        + [(_buffer(hkv, 1, dtype, gen), _buffer(hkv, 1, dtype, gen), 1)],
        [(_buffer(hkv, 16, dtype, gen), _buffer(hkv, 16, dtype, gen), 7)],
        [(_buffer(hkv, 30, dtype, gen), _buffer(hkv, 30, dtype, gen), 30)],
    ]
    host = [
        [
            (_buffer(hkv, 300, dtype, gen), _buffer(hkv, 300, dtype, gen), 300),
            (_buffer(hkv, 512, dtype, gen), _buffer(hkv, 512, dtype, gen), 333),
        ],
        [],
        [(_buffer(hkv, 64, dtype, gen), _buffer(hkv, 64, dtype, gen), 12)],
    ]
    q = torch.randn(3, hq, D, generator=gen).to(dtype) * 2
    scale = D**-0.5
    out, lse = retrieval_decode_attention(
        q, hkv, dtype, _segments(dev), _segments(host), top_k, scale
    )
    for b in range(3):
        ref_out, ref_lse = _reference(q[b], dev[b], host[b], hkv, top_k, scale)
        torch.testing.assert_close(out[b].double(), ref_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[b].double(), ref_lse, atol=2e-5, rtol=1e-5)


def test_bfloat16_output_is_the_rounded_float32_result() -> None:
    gen = torch.Generator().manual_seed(3)
    dev = [[(_buffer(3, 32, torch.bfloat16, gen), _buffer(3, 32, torch.bfloat16, gen), 32)]]
    host = [[(_buffer(3, 200, torch.bfloat16, gen), _buffer(3, 200, torch.bfloat16, gen), 200)]]
    q = torch.randn(1, 9, D, generator=gen)
    args = (q, 3, torch.bfloat16, _segments(dev), _segments(host), 10, 0.125)
    wide, _ = retrieval_decode_attention(*args)
    narrow, _ = retrieval_decode_attention(*args, out_dtype=torch.bfloat16)
    assert torch.equal(narrow, wide.to(torch.bfloat16))


def test_bad_arguments_raise_value_errors() -> None:
    gen = torch.Generator().manual_seed(0)
    dev = _segments([[(_buffer(3, 4, torch.float32, gen), _buffer(3, 4, torch.float32, gen), 4)]])
    host = _segments([[]])
    q = torch.randn(1, 9, D)
    with pytest.raises(ValueError, match="supports"):
        retrieval_decode_attention(q, 3, torch.float16, dev, host, 5, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        retrieval_decode_attention(q, 3, torch.float32, dev, host, 0, 1.0)
    with pytest.raises(ValueError, match="group"):
        retrieval_decode_attention(q, 4, torch.float32, dev, host, 5, 1.0)
    with pytest.raises(ValueError, match="starts"):
        retrieval_decode_attention(q, 3, torch.float32, dev, _segments([[], []]), 5, 1.0)


@pytest.mark.parametrize(("top_k", "q_scale"), [(60, 1.0), (1, 1.0), (60, 300.0)])
def test_ties_and_widely_spread_scores(top_k, q_scale) -> None:
    """Rows repeated 200 times straddle the k-th score (either pick is the same row), and
    a large query spreads scores far beyond the selection's first threshold window."""
    gen = torch.Generator().manual_seed(5)
    dev = [[(_buffer(3, 8, torch.float32, gen), _buffer(3, 8, torch.float32, gen), 8)]]
    hk, hv = _buffer(3, 250, torch.float32, gen), _buffer(3, 250, torch.float32, gen)
    hk[:, 50:], hv[:, 50:] = hk[:, 49:50], hv[:, 49:50]
    host = [[(hk, hv, 250)]]
    q = torch.randn(1, 9, D, generator=gen) * q_scale
    out, lse = retrieval_decode_attention(
        q, 3, torch.float32, _segments(dev), _segments(host), top_k, D**-0.5
    )
    ref_out, ref_lse = _reference(q[0], dev[0], host[0], 3, top_k, D**-0.5)
    torch.testing.assert_close(out[0].double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=2e-5, rtol=1e-5)
