"""Read a model directory's safetensors weights (never pickles)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_safetensors_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of every `*.safetensors` shard in `model_dir`, by checkpoint name."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state
