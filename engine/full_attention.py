"""The `full` attention backend: every token's K and V on the device, exact attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention_backend import AttentionBackend, CacheShape
from engine.forward_context import ForwardContext


class FullKVCache:
    """One sequence's KV for all layers, in growable contiguous buffers [Hkv, cap, D]."""

    def __init__(self, shape: CacheShape, initial_capacity: int = 256) -> None:
        self.shape = shape
        self.length = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._grow(initial_capacity)

    def _grow(self, capacity: int) -> None:
        s = self.shape
        new_k, new_v = [], []
        for layer in range(s.num_layers):
            k = torch.empty(s.num_kv_heads, capacity, s.head_dim, dtype=s.dtype, device=s.device)
            v = torch.empty_like(k)
            if self.length:
                k[:, : self.length] = self.k[layer][:, : self.length]
                v[:, : self.length] = self.v[layer][:, : self.length]
            new_k.append(k)
            new_v.append(v)
        self.k, self.v, self.capacity = new_k, new_v, capacity

    def reserve(self, total_len: int) -> None:
        if total_len > self.capacity:
            self._grow(max(total_len, self.capacity * 2))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def release(self) -> None:
        self.k, self.v, self.length, self.capacity = [], [], 0, 0


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
    if t == 1:
        # Decode: one query per head, so fold each GQA group into a batched matmul.
        qg = q.view(hkv, group, d)
        scores = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, v).view(1, hq, d)
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, t, D]
    kh, vh = k.unsqueeze(0), v.unsqueeze(0)
    if num_cached == 0:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=group > 1
        )
    else:
        mask = causal_mask(t, num_cached, q.device)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=group > 1
        )
    return out.squeeze(0).transpose(0, 1)


class FullAttentionBackend(AttentionBackend):
    """Exact attention over all of each sequence's KV, kept on the device."""

    def __init__(self, shape: CacheShape) -> None:
        super().__init__(shape)
        self._live: dict[int, FullKVCache] = {}

    def new_cache(self) -> FullKVCache:
        cache = FullKVCache(self.shape)
        self._live[id(cache)] = cache
        return cache

    def fork(self, cache: FullKVCache) -> FullKVCache:
        copy = FullKVCache(self.shape, initial_capacity=max(cache.capacity, 1))
        for layer in range(self.shape.num_layers):
            copy.k[layer][:, : cache.length] = cache.k[layer][:, : cache.length]
            copy.v[layer][:, : cache.length] = cache.v[layer][:, : cache.length]
        copy.length = cache.length
        self._live[id(copy)] = copy
        return copy

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
        out = torch.empty_like(q)
        last_layer = layer == self.shape.num_layers - 1
        for s in ctx.slices:
            cache: FullKVCache = s.cache
            total = s.total_len
            if layer == 0:
                cache.reserve(total)
            kb, vb = cache.k[layer], cache.v[layer]
            kb[:, s.num_cached : total] = k[s.start : s.end].transpose(0, 1)
            vb[:, s.num_cached : total] = v[s.start : s.end].transpose(0, 1)
            out[s.start : s.end] = attend_one(
                q[s.start : s.end], kb[:, :total], vb[:, :total], s.num_cached, scale
            )
            if last_layer:
                cache.length = total
        return out

    def memory_stats(self) -> dict[str, int]:
        caches = list(self._live.values())
        return {
            "device_bytes": sum(c.nbytes() for c in caches),
            "device_tokens": sum(c.length for c in caches),
            "host_bytes": 0,
            "host_tokens": 0,
        }
