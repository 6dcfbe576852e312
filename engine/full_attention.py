"""The `full` attention backend: every token's K and V on the device, exact attention.

For the prefix cache a cache can extend frozen segments (`base`): positions
[0, base_len) live in the segments, shared read-only by every child of a snapshot, and
the cache's own buffers hold the rest. Attention over the segments and over the own
part is computed separately and merged by log-sum-exp, so no prefix K/V is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.attention_backend import AttentionBackend, CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from kernels import merge_partials, partial_attention
from kernels.decode_attention import KERNEL_DTYPES, decode_attention, split_units

# Most tokens a growing cache reserves beyond what it needs (1/8 of it when that is less).
GROWTH_MARGIN = 256


def _addresses(tensors) -> np.ndarray:
    return np.array([t.data_ptr() for t in tensors], dtype=np.int64)


@dataclass(frozen=True)
class FullSegment:
    """Frozen K/V [Hkv, n, D] per layer of positions [start, start + n)."""

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    # Buffer addresses per layer, for the decode kernel.
    k_addr: np.ndarray = field(init=False, repr=False, compare=False)
    v_addr: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not all(t.is_contiguous() for t in self.k + self.v):
            raise ValueError("FullSegment tensors must be contiguous (the decode kernel reads)")
        object.__setattr__(self, "k_addr", _addresses(self.k))
        object.__setattr__(self, "v_addr", _addresses(self.v))

    @property
    def length(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class FullSnapshot:
    """A frozen cache of `length` tokens; `own` is the segment it added to its base."""

    length: int
    segments: tuple[FullSegment, ...]
    own: FullSegment | None

    def nbytes(self) -> int:
        """Bytes this snapshot holds beyond those of the snapshots it extends."""
        return self.own.nbytes() if self.own is not None else 0


class FullKVCache:
    """One sequence's KV for all layers: frozen `base` segments, then growable own
    buffers [Hkv, cap, D] holding positions base_len .. length - 1."""

    def __init__(
        self,
        shape: CacheShape,
        initial_capacity: int = 256,
        base: tuple[FullSegment, ...] = (),
        base_len: int = 0,
    ) -> None:
        self.shape = shape
        self.base, self.base_len = base, base_len
        self.length = base_len
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._grow(initial_capacity)

    @property
    def own_len(self) -> int:
        return self.length - self.base_len

    def _grow(self, capacity: int) -> None:
        s = self.shape
        new_k, new_v = [], []
        n = self.own_len
        for layer in range(s.num_layers):
            k = torch.empty(s.num_kv_heads, capacity, s.head_dim, dtype=s.dtype, device=s.device)
            v = torch.empty_like(k)
            if n:
                k[:, :n] = self.k[layer][:, :n]
                v[:, :n] = self.v[layer][:, :n]
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.capacity = new_k, new_v, capacity
        self.k_addr, self.v_addr = _addresses(new_k), _addresses(new_v)

    def reserve(self, total_len: int, exact: bool = False) -> None:
        """Room for a sequence of `total_len` tokens (exactly that much with `exact`)."""
        need = total_len - self.base_len
        if exact and self.own_len <= need != self.capacity:
            self._grow(need)
        elif need > self.capacity:
            # A margin past a long prompt: else its first decode step copies the whole
            # cache at once (2048 tokens: that step took ~95 ms against ~50).
            self._grow(max(need + min(need // 8, GROWTH_MARGIN), self.capacity * 2))

    def freeze(self) -> FullSnapshot:
        """Snapshot this cache and continue as the snapshot's child. The own buffers move
        into the snapshot (copied only when larger than what they hold)."""
        n = self.own_len
        own = None
        if n:
            fit = (lambda t: t) if self.capacity == n else (lambda t: t[:, :n].clone())
            own = FullSegment(tuple(fit(t) for t in self.k), tuple(fit(t) for t in self.v))
        snapshot = FullSnapshot(
            length=self.length, segments=self.base + ((own,) if own is not None else ()), own=own
        )
        self.base, self.base_len = snapshot.segments, snapshot.length
        self.k, self.v, self.capacity = [], [], 0
        self._grow(256)
        return snapshot

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def release(self) -> None:
        self.k, self.v, self.length, self.capacity = [], [], 0, 0
        self.k_addr = self.v_addr = np.zeros(0, dtype=np.int64)
        self.base, self.base_len = (), 0


def causal_mask(num_new: int, num_cached: int, device: torch.device) -> torch.Tensor:
    """Boolean [num_new, num_cached + num_new] mask: True where attention is allowed."""
    rows = torch.arange(num_new, device=device).unsqueeze(1) + num_cached
    cols = torch.arange(num_cached + num_new, device=device).unsqueeze(0)
    return cols <= rows


def attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cached: int, scale: float
) -> torch.Tensor:
    """Causal attention of q [t, Hq, D] over k, v [Hkv, L, D] (L = num_cached + t)."""
    t, hq, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    if t == 1 and q.dtype == torch.float32:
        # Decode: one query per head, so fold each GQA group into a batched matmul.
        qg = q.view(hkv, group, d)
        scores = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v).view(1, hq, d)
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, t, D]
    kh, vh = k.unsqueeze(0), v.unsqueeze(0)
    if num_cached == 0 or t == 1:  # a single query sees every key: no mask needed
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=num_cached == 0, scale=scale, enable_gqa=group > 1
        )
    else:
        mask = causal_mask(t, num_cached, q.device)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=group > 1
        )
    return out.squeeze(0).transpose(0, 1)


def _attend_with_base(
    q: torch.Tensor, cache: FullKVCache, layer: int, first: int, end: int, scale: float
) -> torch.Tensor:
    """Causal attention over the own buffer [0, end) (new tokens from `first`) and every
    base segment, merged by log-sum-exp."""
    kb, vb = cache.k[layer][:, :end], cache.v[layer][:, :end]
    o, lse = partial_attention(q, kb, vb, scale, causal_offset=first)
    for seg in cache.base:
        o, lse = merge_partials(o, lse, *partial_attention(q, seg.k[layer], seg.v[layer], scale))
    return o.to(q.dtype)


@dataclass
class _DecodeBatch:
    """The step's single-token sequences, for `decode_attention`: their rows in the packed
    batch and, per layer, the addresses of their KV segments (frozen base segments, then
    the own buffer)."""

    rows: torch.Tensor | None  # packed indices; None when the step is all of them, in order
    seg_start: np.ndarray  # [B + 1]
    seg_k: np.ndarray  # [num_layers, S]
    seg_v: np.ndarray
    seg_stride: np.ndarray  # [S] elements between KV heads
    seg_len: np.ndarray  # [S] rows attended (the own buffer's include the new token)
    cuts: list[int]  # the kernel's thread split, the same for every layer


def plan_decode_batch(
    slices: list[SequenceSlice], head_dim: int, num_kv_heads: int
) -> _DecodeBatch | None:
    """Group the decode slices (their caches already reserved) for the batched kernel."""
    picked = [s for s in slices if s.num_new == 1]
    if not picked:
        return None
    rows = None
    if len(picked) != len(slices) or any(s.start != i for i, s in enumerate(picked)):
        rows = torch.tensor([s.start for s in picked], dtype=torch.long)
    seg_k, seg_v, stride, length, start = [], [], [], [], [0]
    for s in picked:
        cache: FullKVCache = s.cache
        for seg in cache.base:
            n = seg.length
            seg_k.append(seg.k_addr)
            seg_v.append(seg.v_addr)
            stride.append(n * head_dim)
            length.append(n)
        seg_k.append(cache.k_addr)
        seg_v.append(cache.v_addr)
        stride.append(cache.capacity * head_dim)
        length.append(s.total_len - cache.base_len)
        start.append(len(length))
    seg_start = np.array(start, dtype=np.int64)
    seg_len = np.array(length, dtype=np.int64)
    return _DecodeBatch(
        rows=rows,
        seg_start=seg_start,
        seg_k=np.ascontiguousarray(np.stack(seg_k, axis=1)),
        seg_v=np.ascontiguousarray(np.stack(seg_v, axis=1)),
        seg_stride=np.array(stride, dtype=np.int64),
        seg_len=seg_len,
        cuts=split_units(seg_start, seg_len, num_kv_heads),
    )


class FullAttentionBackend(AttentionBackend):
    """Exact attention over all of each sequence's KV, kept on the device."""

    def __init__(self, shape: CacheShape) -> None:
        super().__init__(shape)
        self._live: dict[int, FullKVCache] = {}
        self._kernel_ok = shape.device.type == "cpu" and shape.dtype in KERNEL_DTYPES
        self._decode: _DecodeBatch | None = None

    def new_cache(self) -> FullKVCache:
        cache = FullKVCache(self.shape)
        self._live[id(cache)] = cache
        return cache

    def fork(self, cache: FullKVCache) -> FullKVCache:
        copy = FullKVCache(self.shape, max(cache.capacity, 1), cache.base, cache.base_len)
        n = cache.own_len
        for layer in range(self.shape.num_layers):
            copy.k[layer][:, :n] = cache.k[layer][:, :n]
            copy.v[layer][:, :n] = cache.v[layer][:, :n]
        copy.length = cache.length
        self._live[id(copy)] = copy
        return copy

    # -- prefix-cache snapshots -------------------------------------------------------------

    def freeze(self, cache: FullKVCache) -> FullSnapshot:
        return cache.freeze()

    def freeze_nbytes(self, cache: FullKVCache) -> int:
        s = self.shape
        row = s.num_kv_heads * s.head_dim * torch.empty(0, dtype=s.dtype).element_size()
        return 2 * s.num_layers * row * cache.own_len

    def plan_freeze(self, cache: FullKVCache, length: int) -> None:
        cache.reserve(length, exact=True)

    def child(self, snapshot: FullSnapshot) -> FullKVCache:
        cache = FullKVCache(self.shape, base=snapshot.segments, base_len=snapshot.length)
        self._live[id(cache)] = cache
        return cache

    def release_snapshot(self, snapshot: FullSnapshot) -> None:
        snapshot.segments, snapshot.own = (), None

    def free(self, cache: FullKVCache) -> None:
        cache.release()
        self._live.pop(id(cache), None)

    def cache_len(self, cache: FullKVCache) -> int:
        return cache.length

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: ForwardContext,
        scale: float,
    ) -> torch.Tensor:
        if layer == 0:
            for s in ctx.slices:
                s.cache.reserve(s.total_len)
            self._decode = None
            if self._kernel_ok:
                self._decode = plan_decode_batch(
                    ctx.slices, self.shape.head_dim, self.shape.num_kv_heads
                )
        decode = self._decode
        out = torch.empty_like(q)
        if decode is not None:
            rows = decode.rows
            pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
            attended, _ = decode_attention(
                pick(q),
                pick(k),
                pick(v),
                decode.seg_start,
                decode.seg_k[layer],
                decode.seg_v[layer],
                decode.seg_stride,
                decode.seg_len,
                scale,
                cuts=decode.cuts,
                out_dtype=q.dtype,
            )
            if rows is None:
                out = attended
            else:
                out.index_copy_(0, rows, attended)
        last_layer = layer == self.shape.num_layers - 1
        for s in ctx.slices:
            cache: FullKVCache = s.cache
            total = s.total_len
            if last_layer:
                cache.length = total
            if decode is not None and s.num_new == 1:
                continue
            kb, vb = cache.k[layer], cache.v[layer]
            first, end = s.num_cached - cache.base_len, total - cache.base_len
            kb[:, first:end] = k[s.start : s.end].transpose(0, 1)
            vb[:, first:end] = v[s.start : s.end].transpose(0, 1)
            qs = q[s.start : s.end]
            if cache.base:
                out[s.start : s.end] = _attend_with_base(qs, cache, layer, first, end, scale)
            else:
                out[s.start : s.end] = attend_one(qs, kb[:, :end], vb[:, :end], first, scale)
        return out

    def memory_stats(self) -> dict[str, int]:
        caches = list(self._live.values())
        return {
            "device_bytes": sum(c.nbytes() for c in caches),
            "device_tokens": sum(c.own_len for c in caches),  # shared: the prefix cache's
            "host_bytes": 0,
            "host_tokens": 0,
        }
