"""`create_index(kind, dim, **options)`: the one way callers construct key indexes."""

from __future__ import annotations

import importlib

from retrieval.base import KeyIndex

# kind -> (module, class). Imported on demand so that `exact` alone never loads faiss.
_KINDS: dict[str, tuple[str, str]] = {
    "exact": ("retrieval.exact", "ExactIndex"),
    "faiss-flat": ("retrieval.faiss_index", "FaissFlatIndex"),
    "faiss-ivf": ("retrieval.faiss_index", "FaissIVFIndex"),
    "faiss-hnsw": ("retrieval.faiss_index", "FaissHNSWIndex"),
    "hnswlib": ("retrieval.hnswlib_index", "HnswlibIndex"),
    "attention-aware": ("retrieval.attention_aware", "AttentionAwareIndex"),
}
INDEX_KINDS: tuple[str, ...] = tuple(_KINDS)
# Kinds that read vectors from a (shareable) KeyStore and accept a `store=` option.
STORE_BACKED_KINDS: tuple[str, ...] = ("exact", "attention-aware")


def index_class(kind: str) -> type[KeyIndex]:
    """The class implementing `kind`."""
    if kind not in _KINDS:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(INDEX_KINDS)}")
    module, name = _KINDS[kind]
    return getattr(importlib.import_module(module), name)


def create_index(kind: str, dim: int, **options) -> KeyIndex:
    """A new, empty index of `kind` over `dim`-dimensional keys.

    Options are the class's constructor arguments, e.g. `nprobe`/`nlist` (faiss-ivf),
    `M`/`ef`/`ef_construction` (faiss-hnsw, hnswlib), `kq`/`degree`/`ef` (attention-aware)
    and `store` (a shared `KeyStore`; exact and attention-aware only).
    """
    cls = index_class(kind)
    try:
        return cls(dim, **options)
    except TypeError as e:
        raise ValueError(f"bad options for {kind!r} index: {e}") from None
