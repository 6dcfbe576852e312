"""The `retrieval` and `streaming` attention backends over a tiered KV cache.

Prefill (a chunk of several tokens) is exact: the chunk's queries attend to the host
tier, the device tier and, causally, to the chunk itself; the host and device parts are
computed separately and merged by log-sum-exp. Decode (one token) in retrieval mode
attends exactly to the device tier (sinks + window + the new token) and to the top-k host
keys the retriever finds for each query head, merging the two (with the exact retriever
on the CPU, one kernel scores the host tier, picks each head's top-k and attends to them
with the device tier: kernels.retrieval_decode). Streaming mode keeps no
host tier: every query sees the sinks and its W preceding tokens (StreamingLLM).

A slice with one new token is a decode: the backend cannot tell a one-token prefill chunk
from a decode step. Prefill chunks of sequences that outgrow the device tier also keep a
strided sample of their queries (`TieredCache.query_samples`) for the attention-aware
index.

Prefix-cache children (`child`) share their snapshot's host segments: prefill attends to
every segment, and decode asks each segment's index (built once, kept in the snapshot)
and the child's own retriever for their top-k, keeping the best k of the union.
"""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch

from engine.attention_backend import AttentionBackend, CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from engine.tiered_cache import (
    ExactRetriever,
    HostRetriever,
    RetrieverFactory,
    TierConfig,
    TieredCache,
    TieredSnapshot,
)
from kernels import (
    attention_over_rows,
    batched_partial_attention,
    gather_rows,
    merge_partials,
    partial_attention,
)
from kernels.decode_attention import KERNEL_DTYPES, decode_attention
from kernels.retrieval_decode import retrieval_decode_attention
from kernels.thread_split import run_split, split_parts

MODES = ("retrieval", "streaming")
_COUNTERS = ("queries", "scanned", "candidates")
MIN_SEQS_PER_SEARCH_THREAD = 2


class TieredAttentionBackend(AttentionBackend):
    """RetrievalAttention (mode="retrieval") or StreamingLLM (mode="streaming")."""

    def __init__(
        self,
        shape: CacheShape,
        mode: str = "retrieval",
        sink_tokens: int = 128,
        window_tokens: int = 512,
        top_k: int = 100,
        retriever_factory: RetrieverFactory | None = None,
        query_sample_size: int = 1024,
    ) -> None:
        super().__init__(shape)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        retrieval = mode == "retrieval"
        self.mode = mode
        self.top_k = top_k
        self.config = TierConfig(
            sink_tokens=sink_tokens,
            window_tokens=window_tokens,
            keep_host=retrieval,
            query_sample_size=query_sample_size if retrieval else 0,
        )
        self.retriever_factory = retriever_factory
        self._live: dict[int, TieredCache] = {}
        self._snapshots: dict[int, TieredSnapshot] = {}
        self._retired = dict.fromkeys(_COUNTERS, 0)
        self._kernel_ok = shape.device.type == "cpu" and shape.dtype in KERNEL_DTYPES
        # With an exact retriever, the CPU decode kernel finds the top-k itself.
        exact = retriever_factory in (None, ExactRetriever)
        self._fused_retrieval = self._kernel_ok and retrieval and exact

    # -- cache lifecycle ------------------------------------------------------------------

    def new_cache(self) -> TieredCache:
        cache = TieredCache(self.shape, self.config, self.retriever_factory)
        self._live[id(cache)] = cache
        return cache

    def fork(self, cache: TieredCache) -> TieredCache:
        retriever, cache.retriever = cache.retriever, None
        shared, cache.shared = cache.shared, ()  # read-only: the copy shares them
        try:
            copy = deepcopy(cache)
        finally:
            cache.retriever, cache.shared = retriever, shared
        copy.shared = shared
        if retriever is not None:  # an index cannot be copied generally: rebuild it
            copy.retriever = copy.retriever_factory(copy)
            for layer in range(self.shape.num_layers):
                copy.retriever.add(layer, copy.host_keys(layer))
        self._live[id(copy)] = copy
        return copy

    def free(self, cache: TieredCache) -> None:
        self._retire(cache.retriever)
        cache.release()
        self._live.pop(id(cache), None)

    def _retire(self, retriever: HostRetriever | None) -> None:
        if retriever is not None:
            for name in _COUNTERS:
                self._retired[name] += getattr(retriever, name)

    # -- prefix-cache snapshots -------------------------------------------------------------

    def freeze(self, cache: TieredCache) -> TieredSnapshot:
        self._retire(cache.retriever)
        if cache.retriever is not None:
            cache.retriever.free()
            cache.retriever = None
        snapshot = cache.freeze()
        self._snapshots[id(snapshot)] = snapshot
        return snapshot

    def freeze_nbytes(self, cache: TieredCache) -> int:
        return cache.freeze_nbytes()

    def plan_freeze(self, cache: TieredCache, length: int) -> None:
        cache.plan_freeze(length)

    def child(self, snapshot: TieredSnapshot) -> TieredCache:
        cache = TieredCache.from_snapshot(self.shape, self.config, snapshot, self.retriever_factory)
        self._live[id(cache)] = cache
        return cache

    def release_snapshot(self, snapshot: TieredSnapshot) -> None:
        self._snapshots.pop(id(snapshot), None)
        if snapshot.own is not None:
            self._retire(snapshot.own.retriever)
            snapshot.own.release()
        snapshot.dev_k, snapshot.dev_v = [], []

    def cache_len(self, cache: TieredCache) -> int:
        return cache.length

    def device_tokens_for(self, total_len: int, num_new: int) -> int:
        return min(total_len - num_new, self.config.device_capacity) + num_new

    # -- attention --------------------------------------------------------------------------

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
                if s.num_cached != s.cache.length:
                    raise ValueError(
                        f"slice says {s.num_cached} cached tokens, cache holds {s.cache.length}"
                    )
                s.cache.reserve(s.total_len)
        out = torch.empty_like(q)
        for s in ctx.slices:
            if s.num_new > 1:
                out[s.start : s.end] = self._prefill(layer, s, q, k, v, scale)
        decodes = [s for s in ctx.slices if s.num_new == 1]
        if decodes:
            self._decode(layer, decodes, q, k, v, scale, out)
        if layer == self.shape.num_layers - 1:
            for s in ctx.slices:
                s.cache.length = s.total_len
        return out

    def _prefill(
        self,
        layer: int,
        s: SequenceSlice,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        cache: TieredCache = s.cache
        n0, m = s.num_cached, s.num_new
        qs = q[s.start : s.end]
        ks, vs = k[s.start : s.end].transpose(0, 1), v[s.start : s.end].transpose(0, 1)
        dk, dv, dpos = cache.device_in_order(layer, n0)
        keys, values = torch.cat([dk, ks], 1), torch.cat([dv, vs], 1)
        if self.config.keep_host:
            out, lse = partial_attention(qs, keys, values, scale, causal_offset=dk.shape[1])
            for hk, hv in cache.host_parts(layer):
                hk = hk.to(q.device, non_blocking=True)
                hv = hv.to(q.device, non_blocking=True)
                out, lse = merge_partials(out, lse, *partial_attention(qs, hk, hv, scale))
            if s.total_len > self.config.device_capacity:
                # Only sequences that will have a host tier need an index, hence queries.
                cache.samplers[layer].add(qs, n0)
        else:
            out, _ = partial_attention(
                qs, keys, values, scale, mask=self._streaming_mask(dpos, n0, m)
            )
        cache.append(layer, ks, vs, n0)
        return out.to(q.dtype)

    def _streaming_mask(self, dpos: torch.Tensor, n0: int, m: int) -> torch.Tensor:
        """Query p sees the sinks and positions p - W .. p."""
        qpos = torch.arange(n0, n0 + m, device=dpos.device).unsqueeze(1)
        kpos = torch.cat([dpos, qpos.squeeze(1)]).unsqueeze(0)
        recent = kpos >= qpos - self.config.window_tokens
        return (kpos <= qpos) & ((kpos < self.config.sink_tokens) | recent)

    def _decode(
        self,
        layer: int,
        slices: list[SequenceSlice],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """One new token for each of `slices`, batched across sequences."""
        if len(slices) == q.shape[0] and all(s.start == i for i, s in enumerate(slices)):
            rows = None  # the whole batch, in order: no gather or scatter
            qd, kd, vd = q, k.contiguous(), v.contiguous()
        else:
            rows = torch.tensor([s.start for s in slices], device=q.device)
            qd, kd, vd = q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows)
        lens = [s.cache.device_len(s.num_cached) for s in slices]
        if self._fused_retrieval and any(s.cache.total_host_len(layer) for s in slices):
            o, lse = self._retrieval_attention(layer, slices, lens, qd, kd, vd, scale)
            self._append_and_write(layer, slices, kd, vd, o, rows, out)
            return
        if self._kernel_ok:
            o, lse = self._device_attention(layer, slices, lens, qd, kd, vd, scale)
        else:
            o, lse = self._padded_device_attention(layer, slices, lens, qd, kd, vd, scale)

        if self.config.keep_host:
            hosted = [i for i, s in enumerate(slices) if s.cache.total_host_len(layer)]
            if hosted:
                pick = torch.tensor(hosted, device=q.device)
                o2, lse2 = self._host_attention(layer, [slices[i] for i in hosted], qd[pick], scale)
                o_m, lse_m = merge_partials(o[pick], lse[pick], o2.to(q.device), lse2.to(q.device))
                o[pick] = o_m

        self._append_and_write(layer, slices, kd, vd, o, rows, out)

    def _append_and_write(
        self,
        layer: int,
        slices: list[SequenceSlice],
        kd: torch.Tensor,
        vd: torch.Tensor,
        o: torch.Tensor,
        rows: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """Store each sequence's new K/V row and write its attention output (to `rows` of
        out, or all of it in order when None)."""
        for i, s in enumerate(slices):
            s.cache.append(layer, kd[i].unsqueeze(1), vd[i].unsqueeze(1), s.num_cached)
        if rows is None:
            out.copy_(o)
        else:
            out.index_copy_(0, rows, o.to(out.dtype))

    def _device_segments(
        self,
        layer: int,
        slices: list[SequenceSlice],
        lens: list[int],
        kd: torch.Tensor,
        vd: torch.Tensor,
    ) -> tuple[np.ndarray, ...]:
        """Each sequence's filled device slots and then its new row (kd, vd [B, Hkv, D],
        contiguous), as the decode kernels' segments (start, k, v, stride, length)."""
        bsz, hkv, d = kd.shape
        row_bytes = hkv * d * kd.element_size()
        new_rows = np.arange(bsz, dtype=np.int64) * row_bytes
        seg_k = np.empty(2 * bsz, dtype=np.int64)
        seg_v = np.empty(2 * bsz, dtype=np.int64)
        seg_k[0::2] = [s.cache.dev_k[layer].data_ptr() for s in slices]
        seg_v[0::2] = [s.cache.dev_v[layer].data_ptr() for s in slices]
        seg_k[1::2] = kd.data_ptr() + new_rows
        seg_v[1::2] = vd.data_ptr() + new_rows
        seg_stride = np.empty(2 * bsz, dtype=np.int64)
        seg_stride[0::2] = [s.cache.dev_k[layer].shape[1] * d for s in slices]
        seg_stride[1::2] = d
        seg_len = np.ones(2 * bsz, dtype=np.int64)
        seg_len[0::2] = lens
        seg_start = np.arange(0, 2 * bsz + 1, 2, dtype=np.int64)
        return seg_start, seg_k, seg_v, seg_stride, seg_len

    def _host_segments(
        self, layer: int, slices: list[SequenceSlice], num_q_heads: int
    ) -> tuple[np.ndarray, ...]:
        """Each sequence's host runs (shared segments, then its own) as kernel segments,
        counting the search on the sequence's retriever as a scan of every host row."""
        start, k_addr, v_addr, stride, length = [0], [], [], [], []
        for s in slices:
            cache: TieredCache = s.cache
            runs = [(seg.host_k, seg.host_v, seg.host_len) for seg in cache.shared]
            runs.append((cache.host_k, cache.host_v, cache.host_len))
            rows = 0
            for keys, values, lens in runs:
                if n := lens[layer]:
                    k_addr.append(keys[layer].data_ptr())
                    v_addr.append(values[layer].data_ptr())
                    stride.append(keys[layer].stride(0))
                    length.append(n)
                    rows += n
            start.append(len(length))
            if rows:
                if cache.retriever is None:
                    cache.retriever = cache.retriever_factory(cache)
                cache.retriever.count_scan(num_q_heads, rows)
        return tuple(np.asarray(x, dtype=np.int64) for x in (start, k_addr, v_addr, stride, length))

    def _retrieval_attention(
        self,
        layer: int,
        slices: list[SequenceSlice],
        lens: list[int],
        qd: torch.Tensor,
        kd: torch.Tensor,
        vd: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Device rows plus each query head's exact top-k host rows, by one CPU kernel
        that scores the host tier in place (the exact retriever's search, fused)."""
        kd, vd = kd.contiguous(), vd.contiguous()
        return retrieval_decode_attention(
            qd,
            self.shape.num_kv_heads,
            self.shape.dtype,
            self._device_segments(layer, slices, lens, kd, vd),
            self._host_segments(layer, slices, qd.shape[1]),
            self.top_k,
            scale,
        )

    def _device_attention(
        self,
        layer: int,
        slices: list[SequenceSlice],
        lens: list[int],
        qd: torch.Tensor,
        kd: torch.Tensor,
        vd: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's filled device slots plus its new token, by the CPU kernel,
        which reads the device buffers in place (attention ignores the slot order)."""
        kd, vd = kd.contiguous(), vd.contiguous()
        segments = self._device_segments(layer, slices, lens, kd, vd)
        return decode_attention(qd, kd, vd, *segments, scale, append=False)

    def _padded_device_attention(
        self,
        layer: int,
        slices: list[SequenceSlice],
        lens: list[int],
        qd: torch.Tensor,
        kd: torch.Tensor,
        vd: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_device_attention` for any device: copy the tiers into a padded batch."""
        width = max(lens) + 1  # the device tiers, padded, then the new token
        ragged = min(lens) != max(lens)
        alloc = torch.zeros if ragged else torch.empty  # padding must not hold NaN
        bsz, hkv, d = kd.shape
        kb = alloc(bsz, hkv, width, d, dtype=self.shape.dtype, device=qd.device)
        vb = alloc(bsz, hkv, width, d, dtype=self.shape.dtype, device=qd.device)
        for i, (s, n) in enumerate(zip(slices, lens, strict=True)):
            if n:
                kb[i, :, :n] = s.cache.dev_k[layer][:, :n]
                vb[i, :, :n] = s.cache.dev_v[layer][:, :n]
        kb[:, :, -1] = kd
        vb[:, :, -1] = vd
        key_mask = None
        if ragged:
            filled = torch.tensor(lens, device=qd.device).unsqueeze(1)
            key_mask = torch.arange(width, device=qd.device).unsqueeze(0) < filled
            key_mask[:, -1] = True
        return batched_partial_attention(qd, kb, vb, scale, key_mask)

    def _host_attention(
        self, layer: int, slices: list[SequenceSlice], q: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q [B, Hq, D] over each sequence's retrieved host keys, on the CPU."""
        qc = q.to("cpu")
        hq = qc.shape[1]
        gathered: list = [None] * len(slices)

        def retrieve(lo: int, hi: int) -> None:
            for j in range(lo, hi):
                gathered[j] = self._retrieve(layer, slices[j].cache, qc[j])

        # Index searches release the GIL (compiled kernels): sequences run on both cores.
        parts = split_parts(len(slices), MIN_SEQS_PER_SEARCH_THREAD)
        run_split(retrieve, len(slices), parts)
        if len(gathered) == 1:
            k_rows, v_rows, valid = (t.unsqueeze(0) for t in gathered[0])
            return attention_over_rows(qc, k_rows, v_rows, scale, valid)
        width = max(g[0].shape[1] for g in gathered)
        bsz, d = len(gathered), qc.shape[2]
        k_rows = torch.zeros(bsz, hq, width, d, dtype=self.shape.dtype)
        v_rows = torch.zeros(bsz, hq, width, d, dtype=self.shape.dtype)
        valid = torch.zeros(bsz, hq, width, dtype=torch.bool)
        for j, (kr, vr, ok) in enumerate(gathered):
            n = kr.shape[1]
            k_rows[j, :, :n], v_rows[j, :, :n], valid[j, :, :n] = kr, vr, ok
        return attention_over_rows(qc, k_rows, v_rows, scale, valid)

    def _retrieve(
        self, layer: int, cache: TieredCache, q: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top-k host rows for q [Hq, D]: k_rows, v_rows [Hq, K, D], valid [Hq, K].

        Each shared segment and the own tier answer separately; of their union the k
        best by exact score are kept, so with exact retrievers this equals one search.
        """
        hq = q.shape[0]
        parts = []
        for seg in cache.shared:
            if seg.host_len[layer]:
                idx = seg.search(layer, q, self.top_k)
                parts.append(gather_rows(seg.host_keys(layer), seg.host_values(layer), idx, hq))
        if cache.host_len[layer]:
            idx = cache.retriever.search(layer, q, self.top_k)
            parts.append(gather_rows(cache.host_keys(layer), cache.host_values(layer), idx, hq))
        if len(parts) == 1:
            return parts[0]
        k_rows, v_rows, valid = (torch.cat(t, dim=1) for t in zip(*parts, strict=True))
        if k_rows.shape[1] > self.top_k:
            scores = torch.matmul(k_rows.float(), q.float().unsqueeze(-1)).squeeze(-1)
            scores.masked_fill_(~valid, float("-inf"))
            top = scores.topk(self.top_k, dim=-1).indices  # [Hq, k]
            rows = top.unsqueeze(-1).expand(-1, -1, k_rows.shape[-1])
            k_rows, v_rows = k_rows.gather(1, rows), v_rows.gather(1, rows)
            valid = valid.gather(1, top)
        return k_rows, v_rows, valid

    # -- accounting -------------------------------------------------------------------------

    def memory_stats(self) -> dict[str, int]:
        caches = list(self._live.values())
        return {
            "device_bytes": sum(c.device_bytes() for c in caches),
            "host_bytes": sum(c.host_bytes() for c in caches),
            "device_tokens": sum(c.device_tokens() for c in caches),
            "host_tokens": sum(c.host_tokens() for c in caches),
        }

    def retrieval_stats(self) -> dict[str, int]:
        """Retriever counters (queries, scanned, candidates) over all caches ever made."""
        totals = dict(self._retired)
        retrievers = [c.retriever for c in self._live.values()]
        retrievers += [s.own.retriever for s in self._snapshots.values() if s.own is not None]
        for retriever in retrievers:
            if retriever is not None:
                for name in _COUNTERS:
                    totals[name] += getattr(retriever, name)
        return totals
