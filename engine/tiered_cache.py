"""One sequence's two-tier KV cache: a bounded device tier and an unbounded host tier.

Token positions of a sequence of n tokens fall into three parts:

    [0, S)            sinks   device tier, slots [0, S) of a [Hkv, S + W, D] buffer
    [S, n - W)        host    host tier (CPU, pinned under CUDA), in position order
    [max(S, n-W), n)  window  device tier, ring slots S + (p - S) % W

so the device tier's filled slots are always the prefix [0, min(n, S + W)). Tokens that
leave the window move to the host tier (or are dropped, in streaming mode) and are added
to the retriever incrementally. The cache stores keys as given (already rotated).

For the prefix cache, `freeze` turns a cache into an immutable `TieredSnapshot` without
copying its host tier: the host rows move into a `HostSegment` (with the query sample
and, once searched, its index) that every child of the snapshot reads. A cache's host
tier is then its `shared` segments (oldest first) followed by its own rows.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.attention_backend import CacheShape
from kernels.decode_attention import KERNEL_DTYPES, score_keys


@dataclass(frozen=True)
class TierConfig:
    """Geometry of the tiers; `keep_host=False` is streaming mode (no host tier)."""

    sink_tokens: int = 128
    window_tokens: int = 512
    keep_host: bool = True
    query_sample_size: int = 1024  # prefill queries kept per (layer, query head)

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {self.window_tokens}")
        if self.query_sample_size < 0:
            raise ValueError(f"query_sample_size must be >= 0, got {self.query_sample_size}")

    @property
    def device_capacity(self) -> int:
        return self.sink_tokens + self.window_tokens


class HostRetriever(ABC):
    """Finds, for each query head, the host-tier keys with the largest inner products.

    One retriever serves one sequence (all layers). Row indices refer to the host tier of
    the query head's KV head (head h reads KV head h // (Hq // Hkv)), in the order the
    keys were added. Counters: `queries` = query vectors searched, `scanned` = keys
    scored, `candidates` = host keys present at those searches (scanned / candidates is
    the fraction of the host tier an index had to look at).
    """

    def __init__(self) -> None:
        self.queries = 0
        self.scanned = 0
        self.candidates = 0

    @abstractmethod
    def add(self, layer: int, keys: torch.Tensor) -> None:
        """Index keys [Hkv, n, D] just appended to `layer`'s host tier."""

    @abstractmethod
    def search(self, layer: int, q: torch.Tensor, k: int) -> torch.Tensor:
        """Row indices [Hq, k'] (long, k' <= k, -1 = padding) for queries q [Hq, D]."""

    def count_scan(self, queries: int, rows: int) -> None:
        """Count a search of `queries` query vectors that scored all `rows` host rows."""
        self.queries += queries
        self.scanned += queries * rows
        self.candidates += queries * rows

    def nbytes(self) -> int:
        """Memory the index holds beyond the host tier itself."""
        return 0

    def free(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the index."""


RetrieverFactory = Callable[[Any], HostRetriever]  # TieredCache or HostSegment -> retriever


class ExactRetriever(HostRetriever):
    """Exact top-k by inner product: every host key scored, then topk. The tiered
    backend's CPU decode does not call `search`: with this retriever it finds the top-k
    inside its fused kernel (kernels.retrieval_decode) and only counts the scan here.
    `search` serves every other caller; on the CPU its scores come from the decode
    kernel's score pass (kernels.decode_attention.score_keys): 4.9x faster than torch's
    bmm on 4K bf16 host keys over 30 layers (4.8 vs 23.2 ms, ad hoc), whose transposed,
    strided operand it could not read in place."""

    def __init__(self, cache: TieredCache) -> None:
        super().__init__()
        self.cache = cache

    def add(self, layer: int, keys: torch.Tensor) -> None:
        pass  # searches read the host tier directly; nothing to index

    def search(self, layer: int, q: torch.Tensor, k: int) -> torch.Tensor:
        keys = self.cache.host_keys(layer)  # [Hkv, N, D]
        hkv, n, d = keys.shape
        hq = q.shape[0]
        if n == 0:
            return torch.empty(hq, 0, dtype=torch.long)
        if keys.device.type == "cpu" and keys.dtype in KERNEL_DTYPES:
            scores = score_keys(q, keys).numpy()
            if k >= n:
                idx = torch.arange(n).repeat(hq, 1)
            else:  # unordered: 4x faster than topk here (53 vs 216 us at 9 x 4096)
                idx = torch.from_numpy(np.argpartition(-scores, k - 1, axis=1)[:, :k])
        else:  # in the keys' own dtype: upcasting would copy the host tier per search
            scores = torch.bmm(q.to(keys.dtype).view(hkv, hq // hkv, d), keys.transpose(1, 2))
            idx = scores.view(hq, n).topk(min(k, n), dim=-1).indices
        self.count_scan(hq, n)
        return idx

    def free(self) -> None:
        self.cache = None


class _QuerySampler:
    """A strided sample of one layer's prefill queries, at most `capacity` per head.

    Keeps the queries at positions that are multiples of `stride`; when full it drops
    every other one and doubles the stride, so the sample stays spread over the prompt.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.stride = 1
        self.count = 0
        self.buf: torch.Tensor | None = None  # [Hq, cap, D] on the CPU
        self.positions = torch.empty(0, dtype=torch.long)

    def add(self, q: torch.Tensor, pos0: int) -> None:
        """q [T, Hq, D] of positions pos0 .. pos0 + T - 1."""
        t = q.shape[0]
        if self.capacity == 0:
            return
        while True:
            first = -(-pos0 // self.stride) * self.stride
            taken = len(range(first, pos0 + t, self.stride))
            if self.count + taken <= self.capacity:
                break
            keep = (self.positions % (2 * self.stride) == 0).nonzero().squeeze(1)
            if len(keep):
                self.buf[:, : len(keep)] = self.buf[:, keep]
            self.positions = self.positions[keep]
            self.count = len(keep)
            self.stride *= 2
        if taken == 0:
            return
        new = q[first - pos0 :: self.stride].transpose(0, 1).to("cpu")
        if self.buf is None or self.count + taken > self.buf.shape[1]:
            size = min(self.capacity, max(self.count + taken, 2 * self.count, 64))
            buf = torch.empty(new.shape[0], size, new.shape[2], dtype=new.dtype)
            if self.count:
                buf[:, : self.count] = self.buf[:, : self.count]
            self.buf = buf
        self.buf[:, self.count : self.count + taken] = new
        pos = torch.arange(first, pos0 + t, self.stride, dtype=torch.long)
        self.positions = torch.cat([self.positions, pos])
        self.count += taken

    def samples(self) -> torch.Tensor | None:
        return None if self.buf is None else self.buf[:, : self.count]

    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


class HostSegment:
    """A frozen run of host-tier rows (every layer) that prefix-cache children read.

    It offers what a retriever reads of a cache (`shape`, `host_len`, `host_keys`,
    `query_samples`), so any retriever kind indexes it; the index is built on the first
    search (by whichever child searches first) and then serves every later child.
    Nothing appends to a segment.
    """

    def __init__(
        self,
        shape: CacheShape,
        host_k: list[torch.Tensor],
        host_v: list[torch.Tensor],
        samplers: list[_QuerySampler],
        retriever_factory: RetrieverFactory,
    ) -> None:
        self.shape = shape
        self.host_k, self.host_v = host_k, host_v
        self.host_len = [t.shape[1] for t in host_k]
        self.samplers = samplers
        self.retriever_factory = retriever_factory
        self.retriever: HostRetriever | None = None
        # Children of one snapshot may search it from several threads at once.
        self._search_lock = threading.Lock()

    def host_keys(self, layer: int) -> torch.Tensor:
        return self.host_k[layer]

    def host_values(self, layer: int) -> torch.Tensor:
        return self.host_v[layer]

    def query_samples(self, layer: int) -> torch.Tensor | None:
        return self.samplers[layer].samples()

    def search(self, layer: int, q: torch.Tensor, k: int) -> torch.Tensor:
        """Row indices [Hq, k'] into this segment for queries q [Hq, D]."""
        with self._search_lock:
            if self.retriever is None:
                self.retriever = self.retriever_factory(self)
            return self.retriever.search(layer, q, k)

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.host_k + self.host_v)
        total += sum(s.nbytes() for s in self.samplers)
        return total + (self.retriever.nbytes() if self.retriever is not None else 0)

    def release(self) -> None:
        if self.retriever is not None:
            self.retriever.free()
        self.host_k, self.host_v, self.samplers = [], [], []
        self.host_len = [0] * self.shape.num_layers


@dataclass
class TieredSnapshot:
    """A frozen cache of `length` tokens: a copy of its device tier (sinks + window) and
    its host segments; `own` is the segment this snapshot added (None: none)."""

    length: int
    dev_k: list[torch.Tensor]
    dev_v: list[torch.Tensor]
    shared: tuple[HostSegment, ...]
    own: HostSegment | None

    def nbytes(self) -> int:
        """Bytes this snapshot holds beyond those of the snapshots it extends."""
        dev = sum(t.numel() * t.element_size() for t in self.dev_k + self.dev_v)
        return dev + (self.own.nbytes() if self.own is not None else 0)


class TieredCache:
    """One sequence's KV for all layers, split into a device tier and a host tier."""

    def __init__(
        self,
        shape: CacheShape,
        config: TierConfig,
        retriever_factory: RetrieverFactory | None = None,
    ) -> None:
        self.shape = shape
        self.config = config
        self.length = 0
        self.retriever_factory = retriever_factory or ExactRetriever
        self.retriever: HostRetriever | None = None  # created when the host tier is first used
        self.pin = shape.device.type == "cuda" and torch.cuda.is_available()
        layers = range(shape.num_layers)
        self.dev_k: list[torch.Tensor] = [self._device_buf(0) for _ in layers]
        self.dev_v: list[torch.Tensor] = [self._device_buf(0) for _ in layers]
        self.host_k: list[torch.Tensor] = [self._host_buf(0) for _ in layers]
        self.host_v: list[torch.Tensor] = [self._host_buf(0) for _ in layers]
        self.host_len = [0] * shape.num_layers  # own rows, after the shared segments'
        self.samplers = [_QuerySampler(config.query_sample_size) for _ in layers]
        self.shared: tuple[HostSegment, ...] = ()  # host rows of the snapshot it extends
        self.shared_len = [0] * shape.num_layers

    @classmethod
    def from_snapshot(
        cls,
        shape: CacheShape,
        config: TierConfig,
        snapshot: TieredSnapshot,
        retriever_factory: RetrieverFactory | None = None,
    ) -> TieredCache:
        """A copy-on-write child of `snapshot`: its own copy of the device tier, the
        snapshot's host segments shared read-only, new host rows in its own tier."""
        cache = cls(shape, config, retriever_factory)
        cache.dev_k = [t.clone() for t in snapshot.dev_k]
        cache.dev_v = [t.clone() for t in snapshot.dev_v]
        cache._extend(snapshot)
        return cache

    def _extend(self, snapshot: TieredSnapshot) -> None:
        layers = range(self.shape.num_layers)
        self.shared = snapshot.shared
        self.shared_len = [sum(seg.host_len[i] for seg in self.shared) for i in layers]
        self.host_k = [self._host_buf(0) for _ in layers]
        self.host_v = [self._host_buf(0) for _ in layers]
        self.host_len = [0] * self.shape.num_layers
        self.samplers = [_QuerySampler(self.config.query_sample_size) for _ in layers]
        self.retriever = None
        self.length = snapshot.length

    def freeze(self) -> TieredSnapshot:
        """Snapshot this cache and continue as the snapshot's child.

        The own host rows (and their query sample) move into a new shared segment
        without a copy when their buffers are exactly full; the device tier is copied.
        The caller retires the own retriever first (its index covered the moved rows).
        """
        own = None
        if any(self.host_len):
            own = HostSegment(
                self.shape,
                [self._fit(t, n) for t, n in zip(self.host_k, self.host_len, strict=True)],
                [self._fit(t, n) for t, n in zip(self.host_v, self.host_len, strict=True)],
                self.samplers,
                self.retriever_factory,
            )
        snapshot = TieredSnapshot(
            length=self.length,
            dev_k=[t.clone() for t in self.dev_k],
            dev_v=[t.clone() for t in self.dev_v],
            shared=self.shared + ((own,) if own is not None else ()),
            own=own,
        )
        self._extend(snapshot)
        return snapshot

    def freeze_nbytes(self) -> int:
        """Bytes `freeze` would hand to the snapshot (device copy, own host rows, samples)."""
        s = self.shape
        row = s.num_kv_heads * s.head_dim * torch.empty(0, dtype=s.dtype).element_size()
        host = 2 * row * sum(self.host_len)
        samples = sum(x.nbytes() for x in self.samplers) if any(self.host_len) else 0
        return self.device_bytes() + host + samples

    def _fit(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """The first n rows of a host buffer, copied only if the buffer holds more."""
        if buf.shape[1] == n:
            return buf
        out = self._host_buf(n)
        out.copy_(buf[:, :n])
        return out

    def plan_freeze(self, length: int) -> None:
        """Size the own host tier to hold exactly the rows it will have at `length` tokens,
        so freezing there moves the buffers instead of copying them."""
        if not self.config.keep_host:
            return
        rows = max(length - self.config.device_capacity, 0) - self.shared_len[0]
        for bufs in (self.host_k, self.host_v):
            for layer, old in enumerate(bufs):
                if old.shape[1] < rows:
                    new = self._host_buf(rows)
                    n = self.host_len[layer]
                    new[:, :n] = old[:, :n]
                    bufs[layer] = new

    # -- buffers ------------------------------------------------------------------------

    def _device_buf(self, capacity: int) -> torch.Tensor:
        s = self.shape
        return torch.empty(s.num_kv_heads, capacity, s.head_dim, dtype=s.dtype, device=s.device)

    def _host_buf(self, capacity: int) -> torch.Tensor:
        s = self.shape
        return torch.empty(s.num_kv_heads, capacity, s.head_dim, dtype=s.dtype, pin_memory=self.pin)

    def reserve(self, total_len: int) -> None:
        """Make room in the device tier for a sequence of `total_len` tokens."""
        need = min(total_len, self.config.device_capacity)
        cap = self.dev_k[0].shape[1]
        if need <= cap:
            return
        cap = min(self.config.device_capacity, max(need, 2 * cap))
        used = min(self.length, self.config.device_capacity)
        for bufs in (self.dev_k, self.dev_v):
            for layer, old in enumerate(bufs):
                new = self._device_buf(cap)
                new[:, :used] = old[:, :used]
                bufs[layer] = new

    def _host_append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n, add = self.host_len[layer], k.shape[1]
        cap = self.host_k[layer].shape[1]
        if n + add > cap:
            cap = max(n + add, 2 * cap, 256)
            for bufs in (self.host_k, self.host_v):
                new = self._host_buf(cap)
                new[:, :n] = bufs[layer][:, :n]
                bufs[layer] = new
        self.host_k[layer][:, n : n + add] = k
        self.host_v[layer][:, n : n + add] = v
        self.host_len[layer] = n + add
        if self.retriever is None:
            self.retriever = self.retriever_factory(self)
        self.retriever.add(layer, self.host_keys(layer)[:, n:])

    # -- reading ------------------------------------------------------------------------

    def device_len(self, n: int) -> int:
        """Filled device slots (a prefix of the buffer) for a sequence of n tokens."""
        return min(n, self.config.device_capacity)

    def _window(self, n: int) -> tuple[int, int]:
        """(first position, count) of the window of a sequence of n tokens."""
        s, w = self.config.sink_tokens, self.config.window_tokens
        count = min(max(n - s, 0), w)
        return n - count, count

    def _ring_segments(self, p: int, count: int) -> list[tuple[int, int, int]]:
        """(offset in the run, first slot, length) of the ring slots of positions p.."""
        s, w = self.config.sink_tokens, self.config.window_tokens
        segments, done = [], 0
        while done < count:
            slot = (p + done - s) % w
            run = min(count - done, w - slot)
            segments.append((done, s + slot, run))
            done += run
        return segments

    def device_in_order(
        self, layer: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sinks then window, in position order: k, v [Hkv, L, D] and positions [L]."""
        ns = min(n, self.config.sink_tokens)
        first, count = self._window(n)
        ks, vs = [self.dev_k[layer][:, :ns]], [self.dev_v[layer][:, :ns]]
        for _, slot, run in self._ring_segments(first, count):
            ks.append(self.dev_k[layer][:, slot : slot + run])
            vs.append(self.dev_v[layer][:, slot : slot + run])
        positions = torch.cat([torch.arange(ns), torch.arange(first, first + count)])
        return torch.cat(ks, 1), torch.cat(vs, 1), positions.to(self.shape.device)

    def host_keys(self, layer: int) -> torch.Tensor:
        """Own host-tier keys [Hkv, N, D] (a view, after the shared segments' rows)."""
        return self.host_k[layer][:, : self.host_len[layer]]

    def total_host_len(self, layer: int) -> int:
        """Host rows of `layer`, shared segments and own."""
        return self.shared_len[layer] + self.host_len[layer]

    def host_parts(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The non-empty host runs (k, v [Hkv, n, D]) of `layer`, in position order."""
        parts = [(seg.host_keys(layer), seg.host_values(layer)) for seg in self.shared]
        parts.append((self.host_keys(layer), self.host_values(layer)))
        return [(k, v) for k, v in parts if k.shape[1]]

    def host_values(self, layer: int) -> torch.Tensor:
        return self.host_v[layer][:, : self.host_len[layer]]

    def query_samples(self, layer: int) -> torch.Tensor | None:
        """Sampled prefill queries [Hq, n, D] of `layer` (CPU), or None before any."""
        return self.samplers[layer].samples()

    def query_sample_positions(self, layer: int) -> torch.Tensor:
        return self.samplers[layer].positions

    # -- writing ------------------------------------------------------------------------

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, n0: int) -> None:
        """Store k, v [Hkv, m, D] of positions n0 .. n0 + m - 1 of `layer`.

        Window tokens pushed out move to the host tier (or are dropped in streaming mode).
        """
        sinks, window = self.config.sink_tokens, self.config.window_tokens
        dk, dv = self.dev_k[layer], self.dev_v[layer]
        m = k.shape[1]
        a = min(max(sinks - n0, 0), m)  # new tokens that are sinks
        if a:
            dk[:, n0 : n0 + a] = k[:, :a]
            dv[:, n0 : n0 + a] = v[:, :a]
        stream = m - a
        if stream == 0:
            return
        first, count = self._window(n0)
        evict = max(0, count + stream - window)
        evict_old = min(evict, count)
        evict_new = evict - evict_old
        if evict and self.config.keep_host:
            out_k, out_v = [], []
            for _, slot, run in self._ring_segments(first, evict_old):
                out_k.append(dk[:, slot : slot + run])
                out_v.append(dv[:, slot : slot + run])
            out_k.append(k[:, a : a + evict_new])
            out_v.append(v[:, a : a + evict_new])
            self._host_append(layer, torch.cat(out_k, 1), torch.cat(out_v, 1))
        start = a + evict_new
        for offset, slot, run in self._ring_segments(n0 + start, m - start):
            dk[:, slot : slot + run] = k[:, start + offset : start + offset + run]
            dv[:, slot : slot + run] = v[:, start + offset : start + offset + run]

    # -- accounting ---------------------------------------------------------------------

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dev_k + self.dev_v)

    def host_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.host_k + self.host_v)
        total += sum(s.nbytes() for s in self.samplers)
        return total + (self.retriever.nbytes() if self.retriever is not None else 0)

    def device_tokens(self) -> int:
        return self.device_len(self.length)

    def host_tokens(self) -> int:
        """Own host rows (shared segments are counted by the prefix cache)."""
        return self.host_len[0] if self.host_len else 0

    def release(self) -> None:
        """Drop every buffer, the query samples, the retriever and the shared segments."""
        if self.retriever is not None:
            self.retriever.free()
            self.retriever = None
        layers = range(self.shape.num_layers)
        self.dev_k = [self._device_buf(0) for _ in layers]
        self.dev_v = [self._device_buf(0) for _ in layers]
        self.host_k = [self._host_buf(0) for _ in layers]
        self.host_v = [self._host_buf(0) for _ in layers]
        self.host_len = [0] * self.shape.num_layers
        self.samplers = [_QuerySampler(self.config.query_sample_size) for _ in layers]
        self.shared, self.shared_len = (), [0] * self.shape.num_layers
        self.length = 0
