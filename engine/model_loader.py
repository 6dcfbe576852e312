"""Load a model directory into our own implementation: config, tokenizer and weights."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.model_config import ModelConfig
from engine.model_files import (
    ModelLoadError,
    conversion_source,
    resolve_model_dir,
    served_model_name,
)
from engine.models import CausalLM, build_model
from engine.tokenizer import load_tokenizer
from engine.weights import load_safetensors_dir
from kernels.block_linear import MATMUL_DTYPES as BLOCK_MATMUL_DTYPES

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Any
    model_dir: Path
    name: str  # the name clients (and adapters' base_model) use for it


def load_model(
    model: str | None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    block_weights: bool = False,
) -> LoadedModel:
    """Load `model` (None/alias for the default model, or a local directory) in eval mode;
    ModelLoadError with one clear line for anything missing or corrupt.

    With `block_weights`, a float32 or bfloat16 CPU model converted from a GGUF also keeps
    that file's quantisation blocks for few-row products (see engine.gguf_blocks)."""
    start = time.monotonic()
    model_dir = resolve_model_dir(model)
    try:
        model_config = ModelConfig.from_dir(model_dir)
    except Exception as exc:  # a malformed config fails in many ways
        raise ModelLoadError(f"cannot read model config in {model_dir}: {exc}") from exc
    tokenizer = load_tokenizer(model_dir)
    net = build_model(model_config, dtype=dtype, device=device)
    try:
        state = load_safetensors_dir(model_dir)
        net.load_hf_state_dict(state)
    except Exception as exc:  # truncated or mismatched files fail in many ways
        raise ModelLoadError(f"cannot load weights from {model_dir}: {exc}") from exc
    net.eval()
    # The blocks hold the checkpoint's exact values: a bfloat16 model's decode reads them
    # instead of its bf16-rounded copy (float32 arithmetic, the result rounded once).
    if block_weights and dtype in BLOCK_MATMUL_DTYPES and device == "cpu":
        source = conversion_source(model_dir)
        if source is not None:
            _attach_blocks(net, source, state, model_dir)
    logger.info(
        "Loaded %s (%s, %d layers) from %s in %.1f s",
        model_dir.name,
        model_config.architecture,
        model_config.num_layers,
        model_dir,
        time.monotonic() - start,
    )
    return LoadedModel(net, model_config, tokenizer, model_dir, served_model_name(model, model_dir))


def _attach_blocks(
    net: CausalLM, gguf: Path, state: dict[str, torch.Tensor], model_dir: Path
) -> None:
    from engine.gguf_blocks import gguf_blocks_for

    start = time.monotonic()
    blocks = gguf_blocks_for(gguf, state, model_dir)
    count = net.use_block_weights(blocks)
    logger.info(
        "Decode multiplies %d weights from %s's quantisation blocks (%.0f MiB, %.1f s)",
        count,
        gguf.name,
        sum(b.nbytes for b in blocks.values()) / 2**20,
        time.monotonic() - start,
    )
