"""Attention over part of a sequence's keys, returning the log-sum-exp of the scores.

Every function returns `(out, lse)` in float32: `out` is the softmax-weighted sum of the
values over the keys a query may see and `lse = log(sum(exp(scale * q.k)))` over the
same keys. Partial results over disjoint key sets merge exactly (`kernels.merge`). A
query that sees no key gets out = 0 and lse = -inf.

GQA: query head h reads KV head h // (Hq // Hkv). KV is never repeated per query head:
the query heads of a group are folded into the rows of one matmul against their KV head.
"""

from __future__ import annotations

import torch

from kernels.merge import NEG_INF, merge_partials

# Score elements per key block in the unfused path (64 MiB of float32).
_SCORE_BUDGET = 1 << 24
_fused_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _group_size(hq: int, hkv: int) -> int:
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def _empty_result(shape: tuple[int, ...], d: int, device: torch.device):
    out = torch.zeros(*shape, d, dtype=torch.float32, device=device)
    return out, torch.full(shape, NEG_INF, dtype=torch.float32, device=device)


def _softmax_out(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [..., M, L] (scaled, -inf where hidden; consumed in place), v [..., L, D]."""
    m = scores.amax(-1, keepdim=True)
    m = m.masked_fill_(m == NEG_INF, 0.0)
    p = scores.sub_(m).exp_()
    den = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v).div_(den.clamp_min(torch.finfo(torch.float32).tiny))
    return out, (m + den.log()).squeeze(-1)


def visibility_mask(
    num_queries: int,
    num_keys: int,
    causal_offset: int | None,
    mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean [T, L] mask (True = visible) from a causal offset and/or an explicit mask.

    With `causal_offset=c`, query t sees keys j <= c + t. None means every key is visible.
    """
    visible = None
    if causal_offset is not None:
        rows = torch.arange(num_queries, device=device).unsqueeze(1) + causal_offset
        visible = torch.arange(num_keys, device=device).unsqueeze(0) <= rows
    if mask is not None:
        if mask.shape != (num_queries, num_keys) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be bool [{num_queries}, {num_keys}], got {mask.dtype} "
                f"{tuple(mask.shape)}"
            )
        visible = mask if visible is None else visible & mask
    return visible


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal_offset: int | None = None,
    mask: torch.Tensor | None = None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T queries over one contiguous block of keys.

    q: [T, Hq, D] (packed tokens of one sequence, or any batch of queries sharing the
    block); k, v: [Hkv, L, D]. `causal_offset` / `mask` restrict which keys each query
    sees (see `visibility_mask`). `fused` picks torch's fused CPU kernel (None: whenever
    it is available and q is on the CPU; it beats bmm + softmax + bmm). Returns
    out [T, Hq, D], lse [T, Hq], float32.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q [T, Hq, D], k and v [Hkv, L, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    t, hq, d = q.shape
    hkv, length, _ = k.shape
    g = _group_size(hq, hkv)
    visible = visibility_mask(t, length, causal_offset, mask, q.device)
    if t == 0 or length == 0:
        return _empty_result((t, hq), d, q.device)
    qg = q.float().view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
    kf, vf = k.float(), v.float()
    if fused is None:
        fused = _fused_cpu is not None and q.device.type == "cpu"
    if fused:
        out, lse = _fused_block(qg, kf, vf, visible, scale, g)
    else:
        out, lse = _unfused_block(qg, kf, vf, visible, scale, g)
    out = out.view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hq, d)
    lse = lse.view(hkv, g, t).permute(2, 0, 1).reshape(t, hq)
    return out, lse


def _fused_block(qg, kf, vf, visible, scale, g):
    """qg [Hkv, G*T, D] rows ordered (group member, token); returns [Hkv, G*T, D], [Hkv, G*T]."""
    if _fused_cpu is None:
        raise ValueError("the fused CPU attention kernel is not available in this torch")
    add_mask = None
    if visible is not None:
        t, length = visible.shape
        add_mask = torch.zeros(t, length, dtype=torch.float32, device=qg.device)
        add_mask.masked_fill_(~visible, NEG_INF)
        add_mask = add_mask.unsqueeze(0).expand(g, t, length).reshape(g * t, length)
    out, lse = _fused_cpu(qg[None], kf[None], vf[None], 0.0, False, attn_mask=add_mask, scale=scale)
    out, lse = out[0], lse[0]
    if visible is not None:
        # The fused kernel reports lse = 0 for a query that sees no key.
        blind = (~visible.any(-1)).repeat(g)
        lse = lse.masked_fill(blind.unsqueeze(0), NEG_INF)
    return out, lse


def _unfused_block(qg, kf, vf, visible, scale, g):
    """bmm + softmax + bmm, over key blocks small enough to bound the score matrix."""
    hkv, rows, _ = qg.shape
    length = kf.shape[1]
    block = max(256, _SCORE_BUDGET // max(1, hkv * rows))
    result = None
    for a in range(0, length, block):
        b = min(length, a + block)
        scores = torch.bmm(qg, kf[:, a:b].transpose(1, 2)).mul_(scale)
        if visible is not None:
            t = visible.shape[0]
            scores.view(hkv, g, t, b - a).masked_fill_(~visible[:, a:b], NEG_INF)
        part = _softmax_out(scores, vf[:, a:b])
        result = part if result is None else merge_partials(*result, *part)
    return result


def batched_partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over that sequence's own key block (batched decode).

    q: [B, Hq, D]; k, v: [B, Hkv, L, D] (blocks padded to a common L); key_mask: bool
    [B, L], True where the key is real. Returns out [B, Hq, D], lse [B, Hq], float32.
    """
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0]:
        raise ValueError(
            f"expected q [B, Hq, D], k and v [B, Hkv, L, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    bsz, hq, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = _group_size(hq, hkv)
    if key_mask is not None and key_mask.shape != (bsz, length):
        raise ValueError(f"key_mask must be [{bsz}, {length}], got {tuple(key_mask.shape)}")
    if bsz == 0 or length == 0:
        return _empty_result((bsz, hq), d, q.device)
    scores = torch.matmul(q.float().view(bsz, hkv, g, d), k.float().transpose(-1, -2))
    scores.mul_(scale)
    if key_mask is not None:
        scores.masked_fill_(~key_mask[:, None, None, :], NEG_INF)
    out, lse = _softmax_out(scores, v.float())
    return out.reshape(bsz, hq, d), lse.reshape(bsz, hq)


def attention_over_rows(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head over its own already-gathered keys.

    q: [B, Hq, D]; k_rows, v_rows: [B, Hq, K, D]; valid: bool [B, Hq, K] (False = padding).
    Returns out [B, Hq, D], lse [B, Hq], float32.
    """
    if k_rows.dim() != 4 or v_rows.shape != k_rows.shape or k_rows.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"expected q [B, Hq, D], rows [B, Hq, K, D]; got q {tuple(q.shape)}, "
            f"k_rows {tuple(k_rows.shape)}, v_rows {tuple(v_rows.shape)}"
        )
    bsz, hq, d = q.shape
    if k_rows.shape[2] == 0:
        return _empty_result((bsz, hq), d, q.device)
    # Row vector times matrix: much faster on CPU than the matrix-vector orientation.
    scores = torch.matmul(q.float().unsqueeze(-2), k_rows.float().transpose(-1, -2))
    scores.mul_(scale)
    if valid is not None:
        scores.masked_fill_(~valid.unsqueeze(-2), NEG_INF)
    out, lse = _softmax_out(scores, v_rows.float())
    return out.squeeze(-2), lse.squeeze(-1)


def gather_rows(
    k_store: torch.Tensor, v_store: torch.Tensor, idx: torch.Tensor, num_q_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather each query head's rows from the per-KV-head stores.

    k_store, v_store: [Hkv, N, D] (any strides; not copied); idx: [..., Hq, K] long,
    -1 = padding. Returns k_rows, v_rows [..., Hq, K, D] and valid [..., Hq, K].
    """
    hkv, n, _ = k_store.shape
    g = _group_size(num_q_heads, hkv)
    if idx.dim() < 2 or idx.shape[-2] != num_q_heads:
        raise ValueError(f"idx must be [..., {num_q_heads}, K], got {tuple(idx.shape)}")
    valid = idx >= 0
    if idx.numel() and int(idx.max()) >= n:
        raise ValueError(f"row index {int(idx.max())} out of range for a store of {n} rows")
    heads = torch.arange(num_q_heads, device=idx.device) // g
    heads = heads.view(*([1] * (idx.dim() - 2)), num_q_heads, 1)
    rows = idx.clamp_min(0)
    out = []
    for store in (k_store, v_store):
        # index_select over a [rows, D] view of the store is far faster than
        # advanced indexing with a (head, row) pair of index tensors.
        flat, head_stride = _row_view(store)
        picked = flat.index_select(0, (heads * head_stride + rows).reshape(-1))
        out.append(picked.view(*idx.shape, store.shape[-1]))
    return out[0], out[1], valid


def _row_view(store: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A [rows, D] view of a [Hkv, N, D] store (no copy when rows are contiguous) and the
    row offset between consecutive heads."""
    hkv, n, d = store.shape
    if store.stride(2) == 1 and store.stride(1) == d and store.stride(0) % d == 0:
        head_stride = store.stride(0) // d
        return store.as_strided(((hkv - 1) * head_stride + n, d), (d, 1)), head_stride
    return store.reshape(hkv * n, d), n


def gathered_partial_attention(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query head over its own rows of the per-KV-head store.

    q: [Hq, D] or [B, Hq, D]; k_store, v_store: [Hkv, N, D]; idx: [Hq, K] or [B, Hq, K]
    row indices into KV head h // G's store, -1 = padding (ignored). Returns (out, lse)
    shaped like q and q[..., 0], float32.
    """
    single = q.dim() == 2
    if single:
        q, idx = q.unsqueeze(0), idx.unsqueeze(0)
    if q.dim() != 3 or idx.dim() != 3 or idx.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"expected q [B, Hq, D] and idx [B, Hq, K]; got {tuple(q.shape)}, {tuple(idx.shape)}"
        )
    if k_store.shape[1] == 0:
        if bool((idx >= 0).any()):
            raise ValueError("row indices given for an empty store")
        out, lse = _empty_result(tuple(q.shape[:2]), q.shape[-1], q.device)
    else:
        k_rows, v_rows, valid = gather_rows(k_store, v_store, idx, q.shape[1])
        out, lse = attention_over_rows(q, k_rows, v_rows, scale, valid)
    return (out[0], lse[0]) if single else (out, lse)
