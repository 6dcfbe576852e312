"""LoFiT adapters: the on-disk format, validation and the importer for official checkpoints.

An adapter picks (layer, head) pairs and gives each a scale `A` and an offset `v`, both
`head_dim` long; the head's attention output before o_proj becomes `(1 + A) * h + v`.

On disk an adapter is a directory holding `adapter_config.json`
(`{"format": "lofit", "base_model", "heads": [[layer, head], ...], "head_dim"}`) and
`adapter.safetensors` with `A` and `v` of shape [len(heads), head_dim]. Only safetensors
are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "lofit"

# Official LoFiT checkpoints keep one [head_dim] parameter per head in a ParameterList.
_OFFICIAL_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.attn_(A|v)\.(\d+)$")


@dataclass
class LofitAdapter:
    """Selected heads and their scale `A` and offset `v`, row i belonging to heads[i]."""

    base_model: str
    heads: list[tuple[int, int]]
    A: torch.Tensor  # [len(heads), head_dim]
    v: torch.Tensor  # [len(heads), head_dim]

    @property
    def head_dim(self) -> int:
        return int(self.A.shape[1])

    def validate(self, model_config: ModelConfig | None = None, base_model: str | None = None):
        """ValueError if the tensors do not match the heads, or (when given) the model."""
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError("LoFiT adapter base_model must be a non-empty string")
        _check_heads(self.heads)
        n = len(self.heads)
        for name, t in (("A", self.A), ("v", self.v)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"LoFiT adapter {name} must be a floating-point tensor")
            if t.dim() != 2 or t.shape[0] != n or t.shape[1] < 1:
                raise ValueError(
                    f"LoFiT adapter {name} must have shape [{n}, head_dim] (one row per "
                    f"selected head), got {list(t.shape)}"
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"LoFiT adapter {name} contains NaN or infinite values")
        if self.A.shape != self.v.shape:
            raise ValueError(
                f"LoFiT adapter A and v must have the same shape, got {list(self.A.shape)} "
                f"and {list(self.v.shape)}"
            )
        if base_model is not None and self.base_model != base_model:
            raise ValueError(
                f"LoFiT adapter was trained for base model {self.base_model!r}, not {base_model!r}"
            )
        if model_config is not None:
            c = model_config
            if self.head_dim != c.head_dim:
                raise ValueError(
                    f"LoFiT adapter head_dim is {self.head_dim}, the model's is {c.head_dim}"
                )
            for layer, head in self.heads:
                if layer >= c.num_layers or head >= c.num_heads:
                    raise ValueError(
                        f"LoFiT adapter head (layer {layer}, head {head}) is out of range for "
                        f"a model with {c.num_layers} layers and {c.num_heads} heads"
                    )


def _check_heads(heads: Any) -> None:
    if not isinstance(heads, list):
        raise ValueError("LoFiT adapter heads must be a list of [layer, head] pairs")
    seen = set()
    for pair in heads:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)
        ):
            raise ValueError(
                f"LoFiT adapter heads must be [layer, head] pairs of non-negative integers, "
                f"got {pair!r}"
            )
        key = (pair[0], pair[1])
        if key in seen:
            raise ValueError(f"LoFiT adapter lists head (layer {key[0]}, head {key[1]}) twice")
        seen.add(key)


def save_adapter(adapter: LofitAdapter, path: str | Path) -> None:
    """Write `adapter` as a LoFiT adapter directory at `path` (created if missing)."""
    adapter.validate()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "base_model": adapter.base_model,
        "heads": [[layer, head] for layer, head in adapter.heads],
        "head_dim": adapter.head_dim,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {"A": adapter.A.detach().contiguous(), "v": adapter.v.detach().contiguous()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def load_adapter(
    path: str | Path, model_config: ModelConfig | None = None, base_model: str | None = None
) -> LofitAdapter:
    """Read a LoFiT adapter directory; checked against `model_config`/`base_model` if given."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"LoFiT adapter path {str(path)!r} is not a directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"LoFiT adapter directory {str(path)!r} has no {name}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {path / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILE} must hold a JSON object")
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{path / CONFIG_FILE}: format must be {FORMAT!r}, got {config.get('format')!r}"
        )
    missing = [k for k in ("base_model", "heads", "head_dim") if k not in config]
    if missing:
        raise ValueError(f"{path / CONFIG_FILE} is missing {', '.join(missing)}")
    head_dim = config["head_dim"]
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ValueError(f"{path / CONFIG_FILE}: head_dim must be a positive integer")
    _check_heads(config["heads"])
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise ValueError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from exc
    for key in ("A", "v"):
        if key not in tensors:
            raise ValueError(f"{path / WEIGHTS_FILE} has no tensor {key!r}")
        if tensors[key].dim() != 2 or tensors[key].shape[1] != head_dim:
            raise ValueError(
                f"{path / WEIGHTS_FILE}: {key} must have shape [{len(config['heads'])}, "
                f"{head_dim}], got {list(tensors[key].shape)}"
            )
    adapter = LofitAdapter(
        base_model=config["base_model"],
        heads=[(layer, head) for layer, head in config["heads"]],
        A=tensors["A"],
        v=tensors["v"],
    )
    adapter.validate(model_config, base_model)
    return adapter


def import_official(path: str | Path, base_model: str, head_dim: int) -> LofitAdapter:
    """Convert an official LoFiT checkpoint (a safetensors file or a directory of shards)
    into an adapter, keeping only heads whose `attn_A` or `attn_v` is non-zero."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"LoFiT checkpoint {str(path)!r} does not exist")
    if not files:
        raise ValueError(f"no *.safetensors files in {str(path)!r}")
    found: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    m = _OFFICIAL_KEY.search(key)
                    if m is None:
                        continue
                    t = f.get_tensor(key)
                    if t.shape != (head_dim,):
                        raise ValueError(
                            f"{key} in {file.name} has shape {list(t.shape)}, expected [{head_dim}]"
                        )
                    head = (int(m.group(1)), int(m.group(3)))
                    found.setdefault(head, {})[m.group(2)] = t.float()
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise ValueError(f"cannot read {file}: {exc}") from exc
    if not found:
        raise ValueError(
            f"no LoFiT tensors (model.layers.N.self_attn.attn_A.H / attn_v.H) in {str(path)!r}"
        )
    zeros = torch.zeros(head_dim)
    heads, rows_a, rows_v = [], [], []
    for head in sorted(found):
        a, v = found[head].get("A", zeros), found[head].get("v", zeros)
        if a.any() or v.any():
            heads.append(head)
            rows_a.append(a)
            rows_v.append(v)
    if not heads:
        raise ValueError(f"every LoFiT head in {str(path)!r} is all zeros (nothing selected)")
    adapter = LofitAdapter(base_model, heads, torch.stack(rows_a), torch.stack(rows_v))
    adapter.validate()
    return adapter
