"""Document (prefix) cache: reuse a prompt prefix's KV, both tiers, and its built indexes.

Prompts are cut into 256-token blocks hashed in a chain: a block's hash covers its
tokens, every earlier block and the namespace (model, dtype, the sequence's `cache_key`
— LoFiT adapter, bias correction, attention mode — and the tier and index settings), so
one hash names a whole prefix under everything its KV depends on.

An entry is a backend snapshot of a sequence's cache at a block boundary B (see
`AttentionBackend.freeze`): a prefilling sequence stops a chunk at B (the scheduler caps
the chunk), its cache is frozen there without copying, and it goes on as the snapshot's
first child. A later sequence whose prompt starts with the same blocks becomes a
copy-on-write child of the longest matching snapshot and prefills only the rest.

Where to snapshot: at the last boundary of the prompt; if the lookup found nothing, also
at the one before it (so a document followed by different questions of up to ~256
tokens is found by the next request); and where the lookup shows the prompt shares more
blocks with a cached entry than any snapshot covers (a longer question, a conversation
that branched), at that shared boundary, so the requests after it hit.

Entries are reference-counted (by live child caches and by the entries that extend
them) and evicted least-recently-used, only when unreferenced, to keep the bytes held
within `max_bytes`. A chain is at most `MAX_CHAIN` snapshots deep: each level is one
more partial attention (and index search) per layer and step for its children.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.attention_router import AttentionRouter
from engine.sequence import Sequence

BLOCK_TOKENS = 256
# A sequence keeps at least this many prompt tokens to prefill after a hit: the tiered
# backends treat a one-token chunk as a decode step (retrieved, not exact, attention).
MIN_SUFFIX = 2
MAX_CHAIN = 8


def prefix_boundary(num_tokens: int) -> int:
    """The longest block boundary a sequence of `num_tokens` may reuse (0: none)."""
    return max(num_tokens - MIN_SUFFIX, 0) // BLOCK_TOKENS * BLOCK_TOKENS


def block_hashes(namespace: bytes, tokens: list[int], num_blocks: int) -> list[bytes]:
    """Chain hashes of the first `num_blocks` blocks: entry j names tokens[: 256 (j + 1)]."""
    digest = hashlib.blake2b(namespace, digest_size=16).digest()
    hashes = []
    for j in range(num_blocks):
        block = array("q", tokens[j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS]).tobytes()
        digest = hashlib.blake2b(digest + block, digest_size=16).digest()
        hashes.append(digest)
    return hashes


def attention_settings(config: Any) -> dict[str, tuple]:
    """Per attention mode, the engine settings that shape its cached state."""
    tiers = (config.sink_tokens, config.window_tokens)
    index = (config.index, tuple(sorted(config.index_options.items())))
    return {"full": (), "streaming": tiers, "retrieval": tiers + index}


@dataclass(eq=False)
class PrefixEntry:
    """A snapshot of `length` tokens of mode `mode`, extending `parent` (or nothing)."""

    key: bytes
    length: int
    mode: str
    lofit: str | None
    cache_key: tuple  # the sequence's `cache_key`
    snapshot: Any
    parent: PrefixEntry | None
    nbytes: int
    blocks: list[bytes]  # the chain hashes of its blocks, first to last
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)


class PrefixCache:
    """The engine's prefix cache: lookup on allocation, snapshots at block boundaries."""

    def __init__(
        self,
        router: AttentionRouter,
        max_bytes: int,
        namespace: tuple = (),
        mode_settings: dict[str, tuple] | None = None,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {max_bytes}")
        self.router = router
        self.max_bytes = max_bytes
        self.namespace = namespace
        self.mode_settings = mode_settings or {}
        self._entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()  # least recent first
        self._blocks: dict[bytes, int] = {}  # block hash -> entries whose prefix has it
        self._plans: dict[int, list[int]] = {}  # seq_id -> boundaries still to snapshot
        self.held_bytes = 0
        self.queries = self.query_tokens = self.hits = self.hit_tokens = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _hashes(self, seq: Sequence, tokens: list[int], num_blocks: int) -> list[bytes]:
        ns = (self.namespace, self.mode_settings.get(seq.attention_mode), seq.cache_key)
        return block_hashes(repr(ns).encode(), tokens, num_blocks)

    # -- engine hooks ---------------------------------------------------------------------

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` a cache: a child of the longest cached prefix of its tokens (setting
        `num_computed` past it) or a new one; plan where it snapshots (module doc)."""
        mode = seq.attention_mode
        if not self.enabled:
            seq.cache = self.router.new_cache(mode)
            return
        tokens = seq.token_slice(0, seq.num_tokens)
        hashes = self._hashes(seq, tokens, prefix_boundary(len(tokens)) // BLOCK_TOKENS)
        self.queries += 1
        self.query_tokens += len(tokens)
        entry = next((self._entries[h] for h in reversed(hashes) if h in self._entries), None)
        if entry is None:
            seq.cache = self.router.new_cache(mode)
        else:
            self._entries.move_to_end(entry.key)
            entry.refs += 1
            entry.last_used = time.monotonic()
            seq.cache = self.router.child(mode, entry.snapshot)
            seq.num_computed = entry.length
            seq.prefix_entry = entry
            self.hits += 1
            self.hit_tokens += entry.length
        last = prefix_boundary(len(seq.prompt_token_ids))
        wanted = {last} if entry is not None else {last, last - BLOCK_TOKENS}
        shared = next((j for j in range(len(hashes), 0, -1) if hashes[j - 1] in self._blocks), 0)
        wanted.add(min(shared * BLOCK_TOKENS, last))
        plan = sorted(
            b
            for b in wanted
            if b > seq.num_computed and hashes[b // BLOCK_TOKENS - 1] not in self._entries
        )
        if plan:
            self._plans[seq.seq_id] = plan
            self._next_snapshot(seq)

    def _next_snapshot(self, seq: Sequence) -> None:
        plan = self._plans.get(seq.seq_id)
        if not plan:
            self._plans.pop(seq.seq_id, None)
            seq.snapshot_at = None
            return
        seq.snapshot_at = plan.pop(0)
        self.router.owner(seq.cache).plan_freeze(seq.cache, seq.snapshot_at)

    def release(self, seq: Sequence) -> None:
        """Free the sequence's cache and its reference to a snapshot."""
        if seq.cache is not None:
            self.router.free(seq.cache)
            seq.cache = None
        entry, seq.prefix_entry, seq.snapshot_at = seq.prefix_entry, None, None
        self._plans.pop(seq.seq_id, None)
        if entry is not None:
            entry.refs -= 1
            self._refresh([entry])
            self._make_room(0)

    def after_step(self, seqs: Iterable[Sequence]) -> None:
        """Snapshot the sequences that just reached their boundary; re-measure entries in
        use (a child's first search builds a shared index) and evict to the limit."""
        in_use = []
        for seq in seqs:
            if seq.snapshot_at is not None and seq.num_computed == seq.snapshot_at:
                self._snapshot(seq)
                self._next_snapshot(seq)
            if seq.prefix_entry is not None:
                in_use.append(seq.prefix_entry)
        if in_use:
            self._refresh(in_use)
            self._make_room(0)

    def drop_adapter(self, name: str) -> None:
        """Evict the entries of LoFiT adapter `name` (unloaded: the name may be reused)."""
        self.drop_where(lambda entry: entry.lofit == name)

    def drop_where(self, doomed: Callable[[PrefixEntry], bool]) -> None:
        """Evict the unreferenced entries `doomed` picks, e.g. those of an unloaded adapter
        or bias profile (by `entry.lofit` or `entry.cache_key`)."""
        picked = [e for e in self._entries.values() if doomed(e)]
        for entry in sorted(picked, key=lambda e: -e.length):  # children before parents
            if entry.refs == 0:
                self._evict(entry)

    def stats(self) -> dict[str, int]:
        """Counters since start (queries, query_tokens, hits, hit_tokens, evictions) and
        what is held now (bytes, entries)."""
        return {
            "queries": self.queries,
            "query_tokens": self.query_tokens,
            "hits": self.hits,
            "hit_tokens": self.hit_tokens,
            "evictions": self.evictions,
            "bytes": self.held_bytes,
            "entries": len(self._entries),
        }

    # -- entries --------------------------------------------------------------------------

    def _snapshot(self, seq: Sequence) -> None:
        length, seq.snapshot_at = seq.snapshot_at, None
        blocks = self._hashes(seq, seq.token_slice(0, length), length // BLOCK_TOKENS)
        key = blocks[-1]
        if key in self._entries:  # another sequence got there first
            return
        depth, parent = 1, seq.prefix_entry
        while parent is not None:
            depth, parent = depth + 1, parent.parent
        if depth > MAX_CHAIN:
            return
        backend = self.router.owner(seq.cache)
        if not self._make_room(backend.freeze_nbytes(seq.cache)):
            return
        snapshot = backend.freeze(seq.cache)
        # The sequence's reference to its parent entry passes to the new entry.
        entry = PrefixEntry(
            key=key,
            length=length,
            mode=seq.attention_mode,
            lofit=seq.lofit,
            cache_key=seq.cache_key,
            snapshot=snapshot,
            parent=seq.prefix_entry,
            nbytes=snapshot.nbytes(),
            blocks=blocks,
            refs=1,
        )
        self._entries[key] = entry
        for block in blocks:
            self._blocks[block] = self._blocks.get(block, 0) + 1
        self.held_bytes += entry.nbytes
        seq.prefix_entry = entry

    def _refresh(self, entries: list[PrefixEntry]) -> None:
        seen: set[int] = set()
        for entry in entries:
            while entry is not None and id(entry) not in seen:
                seen.add(id(entry))
                if entry.key in self._entries:
                    nbytes = entry.snapshot.nbytes()
                    self.held_bytes += nbytes - entry.nbytes
                    entry.nbytes = nbytes
                entry = entry.parent

    def _make_room(self, nbytes: int) -> bool:
        """Evict unreferenced entries, least recently used first, until `nbytes` more fit."""
        if nbytes > self.max_bytes:
            return False
        while self.held_bytes + nbytes > self.max_bytes:
            victim = next((e for e in self._entries.values() if e.refs == 0), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, entry: PrefixEntry) -> None:
        del self._entries[entry.key]
        for block in entry.blocks:
            self._blocks[block] -= 1
            if not self._blocks[block]:
                del self._blocks[block]
        self.held_bytes -= entry.nbytes
        self.evictions += 1
        self.router.backend(entry.mode).release_snapshot(entry.snapshot)
        if entry.parent is not None:
            entry.parent.refs -= 1
