"""Top-k inner-product indexes over attention keys (one KV head each).

Kinds: exact, faiss-flat, faiss-ivf, faiss-hnsw, hnswlib, attention-aware (RoarGraph
style, built from prefill queries' top keys). Construct with `create_index`; share the
vectors of a KV head between the indexes of its query heads with a `KeyStore`.
"""

from retrieval.base import KeyIndex, SearchResult
from retrieval.exact import exact_topk
from retrieval.factory import INDEX_KINDS, STORE_BACKED_KINDS, create_index, index_class
from retrieval.key_store import KeyStore
from retrieval.parallel import BuildJob, build_indexes

__all__ = [
    "INDEX_KINDS",
    "STORE_BACKED_KINDS",
    "BuildJob",
    "KeyIndex",
    "KeyStore",
    "SearchResult",
    "build_indexes",
    "create_index",
    "exact_topk",
    "index_class",
]
