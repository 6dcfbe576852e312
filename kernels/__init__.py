"""Attention math: partial attention with log-sum-exp and the exact merge of partials."""

from kernels.merge import merge_partials
from kernels.partial_attention import (
    attention_over_rows,
    batched_partial_attention,
    gather_rows,
    gathered_partial_attention,
    partial_attention,
    visibility_mask,
)

__all__ = [
    "attention_over_rows",
    "batched_partial_attention",
    "gather_rows",
    "gathered_partial_attention",
    "merge_partials",
    "partial_attention",
    "visibility_mask",
]
