"""Recover the quantisation blocks of a model converted from a GGUF file.

The default model is dequantised once to float32 safetensors (engine.model_files). Its
GGUF still holds the same weights as Q4_1 / Q8_0 blocks, which decode can multiply
from directly (kernels.block_linear) at a quarter of the memory traffic. Each block
weight is checked against the loaded dense tensor, value for value, and used only if
equal; transformers' conversion reorders the rows of q/k for its RoPE layout, so rows
are matched by content when the order differs.

Reading the GGUF's metadata takes seconds (its vocabulary), so the matched blocks are
kept next to the converted weights (`gguf-blocks.cache`, safetensors format) and read
from there while neither file changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from kernels.block_linear import BLOCK, BlockWeight

logger = logging.getLogger(__name__)

# GGUF tensor name -> HF (Llama-family) name, "{}" the layer index.
_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    match = re.match(r"blk\.(\d+)\.(.*)$", gguf_name)
    if match is None:
        return _LLAMA_NAMES.get(gguf_name)
    template = _LLAMA_NAMES.get("blk.{}." + match.group(2))
    return template.format(match.group(1)) if template else None


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def _decode_blocks(kind: str, data: np.ndarray, rows: int) -> BlockWeight | None:
    """(q, d, m) of a Q4_1 or Q8_0 tensor's raw bytes [rows, blocks * block_bytes]."""
    if kind == "Q4_1":
        raw = data.reshape(rows, -1, 20)
        qs = raw[:, :, 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(rows, -1)
        return BlockWeight(q, _f16(raw[:, :, 0:2]), _f16(raw[:, :, 2:4]))
    if kind == "Q8_0":
        raw = data.reshape(rows, -1, 34)
        q = np.ascontiguousarray(raw[:, :, 2:]).view(np.int8).reshape(rows, -1)
        return BlockWeight(q, _f16(raw[:, :, 0:2]))
    return None


def _align_rows(weight: BlockWeight, dense: torch.Tensor) -> BlockWeight | None:
    """`weight` with its rows in `dense`'s order, or None unless every value matches."""
    blocks = weight.dequantize()
    if blocks.shape != dense.shape:
        return None
    if torch.equal(blocks, dense):
        return weight
    index = {row.tobytes(): i for i, row in enumerate(blocks.numpy())}
    order = [index.get(row.tobytes()) for row in dense.numpy()]
    if None in order:
        return None
    q, d, m = weight.blocks()
    return BlockWeight(q[order], d[order], m[order])


def load_gguf_blocks(gguf_path: Path, dense: dict[str, torch.Tensor]) -> dict[str, BlockWeight]:
    """Block weights of `gguf_path` keyed by HF name, for those equal to `dense[name]`.

    `dense` is the loaded float32 HF state dict; names it lacks (e.g. a tied lm_head)
    are skipped. Anything that does not match value for value is left out and logged.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    found: dict[str, BlockWeight] = {}
    mismatched = []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        target = dense.get(name) if name else None
        if target is None or target.dtype != torch.float32 or target.dim() != 2:
            continue
        if target.shape[1] % BLOCK:
            continue
        blocks = _decode_blocks(tensor.tensor_type.name, np.asarray(tensor.data), target.shape[0])
        if blocks is None:
            continue
        aligned = _align_rows(blocks, target)
        if aligned is None:
            mismatched.append(name)
        else:
            found[name] = aligned
    if mismatched:
        logger.warning("GGUF blocks differ from the loaded weights, kept dense: %s", mismatched)
    return found


CACHE_FILE = "gguf-blocks.cache"  # not *.safetensors: those are read as the weights
# Bumped when BlockWeight's stored layout changes, so older cache files are rebuilt
# (2: 4-bit weights in tiles of 16 rows).
CACHE_LAYOUT = 2


def _fingerprint(gguf_path: Path, model_dir: Path) -> str:
    files = [gguf_path, *sorted(model_dir.glob("*.safetensors"))]
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return json.dumps({"layout": CACHE_LAYOUT, "files": stats})


def _read_cache(path: Path, fingerprint: str) -> dict[str, BlockWeight] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return None
            layout = json.loads(meta["layout"])  # name -> [out_features, packed]
            parts = (".q", ".d", ".m")
            return {
                name: BlockWeight.from_tiles(*(f.get_tensor(name + p) for p in parts), n, packed)
                for name, (n, packed) in layout.items()
            }
    except (OSError, ValueError, KeyError, json.JSONDecodeError):  # absent or unreadable
        return None


def _write_cache(path: Path, blocks: dict[str, BlockWeight], fingerprint: str) -> None:
    from safetensors.numpy import save_file

    arrays = {}
    for name, weight in blocks.items():
        q, d, m = weight.tiles()
        arrays.update({name + ".q": q, name + ".d": d, name + ".m": m})
    layout = json.dumps({name: [w.out_features, w.packed] for name, w in blocks.items()})
    try:
        fd, tmp = tempfile.mkstemp(prefix=".blocks-", dir=path.parent)
        os.close(fd)
        save_file(arrays, tmp, metadata={"fingerprint": fingerprint, "layout": layout})
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a read-only model directory: work without the cache
        logger.info("Not caching GGUF blocks in %s: %s", path.parent, exc)
        Path(tmp).unlink(missing_ok=True)


def gguf_blocks_for(
    gguf_path: Path, dense: dict[str, torch.Tensor], model_dir: Path
) -> dict[str, BlockWeight]:
    """load_gguf_blocks, read from `model_dir`'s cache file when it is up to date."""
    fingerprint = _fingerprint(gguf_path, model_dir)
    cache = model_dir / CACHE_FILE
    blocks = _read_cache(cache, fingerprint)
    if blocks is None:
        blocks = load_gguf_blocks(gguf_path, dense)
        _write_cache(cache, blocks, fingerprint)
    return blocks
