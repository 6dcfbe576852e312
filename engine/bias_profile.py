"""Anchored-bias profiles: the on-disk format, validation, load and save.

A profile holds two corrections for lettered multiple-choice prompts, both found by
`engine.bias_calibrate` on calibration data:

- `anchored` (activation space, every position of the request's rows): the chosen MLP
  neurons' activations are multiplied by `neuron_scales` and the chosen attention heads'
  outputs (before o_proj) get `head_offsets` added.
- `prior` (PriDe): `prior` is the model's prior over the option letters; its centred log
  is subtracted from the letter tokens' logits.

On disk a profile is a directory with `bias_profile.json` (`{"format": "bias_profile",
"base_model", "letters", "letter_token_ids", "neurons": [[layer, index], ...],
"heads": [[layer, head], ...], "head_dim", "calibration": {...}}`) and
`bias_profile.safetensors` with `neuron_scales` [len(neurons)], `head_offsets`
[len(heads), head_dim] and `prior` [len(letters)]. Only safetensors are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.model_config import ModelConfig

CONFIG_FILE = "bias_profile.json"
WEIGHTS_FILE = "bias_profile.safetensors"
FORMAT = "bias_profile"


@dataclass
class BiasProfile:
    """Corrections for one model and one set of option letters."""

    base_model: str
    letters: list[str]
    letter_token_ids: list[int]
    neurons: list[tuple[int, int]]  # (layer, MLP intermediate index)
    neuron_scales: torch.Tensor  # [len(neurons)]; 1 = unchanged
    heads: list[tuple[int, int]]  # (layer, attention head)
    head_offsets: torch.Tensor  # [len(heads), head_dim]
    prior: torch.Tensor  # [len(letters)], sums to 1
    calibration: dict[str, Any] = field(default_factory=dict)  # how it was made; informative

    def prior_logit_bias(self) -> dict[int, float]:
        """PriDe's correction as an additive logit bias on the letter tokens:
        minus the centred log prior (so the letters' total mass barely moves)."""
        log_prior = self.prior.double().log()
        bias = -(log_prior - log_prior.mean())
        return {t: float(b) for t, b in zip(self.letter_token_ids, bias, strict=True)}

    def validate(self, model_config: ModelConfig | None = None, base_model: str | None = None):
        """ValueError naming what is wrong; checked against the model when given."""
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError("bias profile base_model must be a non-empty string")
        if not self.letters or any(not isinstance(x, str) or not x for x in self.letters):
            raise ValueError("bias profile letters must be a non-empty list of strings")
        if len(self.letter_token_ids) != len(self.letters) or not all(
            _is_index(t) for t in self.letter_token_ids
        ):
            raise ValueError("bias profile needs one non-negative letter token id per letter")
        _check_pairs(self.neurons, "neurons", "[layer, index]")
        _check_pairs(self.heads, "heads", "[layer, head]")
        _check_tensor(self.neuron_scales, "neuron_scales", [len(self.neurons)])
        if self.head_offsets.dim() != 2:
            raise ValueError(
                f"bias profile head_offsets must be [len(heads), head_dim], got "
                f"{list(self.head_offsets.shape)}"
            )
        _check_tensor(self.head_offsets, "head_offsets", [len(self.heads), -1])
        _check_tensor(self.prior, "prior", [len(self.letters)])
        if (self.prior <= 0).any() or abs(float(self.prior.sum()) - 1) > 1e-3:
            raise ValueError("bias profile prior must be positive and sum to 1")
        if base_model is not None and self.base_model != base_model:
            raise ValueError(
                f"bias profile was calibrated for base model {self.base_model!r}, "
                f"not {base_model!r}"
            )
        if model_config is not None:
            self._check_fits(model_config)

    def _check_fits(self, c: ModelConfig) -> None:
        if self.heads and self.head_offsets.shape[1] != c.head_dim:
            raise ValueError(
                f"bias profile head_dim is {self.head_offsets.shape[1]}, the model's is "
                f"{c.head_dim}"
            )
        for layer, index in self.neurons:
            if layer >= c.num_layers or index >= c.intermediate_size:
                raise ValueError(
                    f"bias profile neuron (layer {layer}, index {index}) is out of range for a "
                    f"model with {c.num_layers} layers and {c.intermediate_size} MLP neurons"
                )
        for layer, head in self.heads:
            if layer >= c.num_layers or head >= c.num_heads:
                raise ValueError(
                    f"bias profile head (layer {layer}, head {head}) is out of range for a "
                    f"model with {c.num_layers} layers and {c.num_heads} heads"
                )
        for t in self.letter_token_ids:
            if t >= c.vocab_size:
                raise ValueError(f"bias profile letter token id {t} is outside the vocabulary")


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_pairs(pairs: Any, name: str, shape: str) -> None:
    if not isinstance(pairs, list):
        raise ValueError(f"bias profile {name} must be a list of {shape} pairs")
    seen = set()
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(map(_is_index, pair)):
            raise ValueError(
                f"bias profile {name} must be {shape} pairs of non-negative integers, got {pair!r}"
            )
        if tuple(pair) in seen:
            raise ValueError(f"bias profile lists {name[:-1]} {list(pair)} twice")
        seen.add(tuple(pair))


def _check_tensor(t: Any, name: str, shape: list[int]) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"bias profile {name} must be a floating-point tensor")
    if t.dim() != len(shape) or any(s not in (-1, n) for s, n in zip(shape, t.shape, strict=True)):
        want = ", ".join("head_dim" if s == -1 else str(s) for s in shape)
        raise ValueError(f"bias profile {name} must have shape [{want}], got {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"bias profile {name} contains NaN or infinite values")


def save_profile(profile: BiasProfile, path: str | Path) -> None:
    """Write `profile` as a directory at `path` (created if missing)."""
    profile.validate()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "base_model": profile.base_model,
        "letters": list(profile.letters),
        "letter_token_ids": list(profile.letter_token_ids),
        "neurons": [list(p) for p in profile.neurons],
        "heads": [list(p) for p in profile.heads],
        "head_dim": int(profile.head_offsets.shape[1]),
        "calibration": profile.calibration,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    tensors = {
        "neuron_scales": profile.neuron_scales.detach().float().contiguous(),
        "head_offsets": profile.head_offsets.detach().float().contiguous(),
        "prior": profile.prior.detach().float().contiguous(),
    }
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def load_profile(
    path: str | Path, model_config: ModelConfig | None = None, base_model: str | None = None
) -> BiasProfile:
    """Read a profile directory; checked against `model_config`/`base_model` if given."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"bias profile path {str(path)!r} is not a directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"bias profile directory {str(path)!r} has no {name}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {path / CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a bias profile (format {FORMAT!r})")
    keys = ("base_model", "letters", "letter_token_ids", "neurons", "heads", "head_dim")
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{path / CONFIG_FILE} is missing {', '.join(missing)}")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise ValueError(f"cannot read {path / WEIGHTS_FILE}: {exc}") from exc
    missing = [k for k in ("neuron_scales", "head_offsets", "prior") if k not in tensors]
    if missing:
        raise ValueError(f"{path / WEIGHTS_FILE} has no tensor {', '.join(missing)}")
    for key in ("neurons", "heads"):
        _check_pairs(config[key], key, "[layer, x]")
    profile = BiasProfile(
        base_model=config["base_model"],
        letters=config["letters"],
        letter_token_ids=config["letter_token_ids"],
        neurons=[tuple(p) for p in config["neurons"]],
        neuron_scales=tensors["neuron_scales"],
        heads=[tuple(p) for p in config["heads"]],
        head_offsets=tensors["head_offsets"],
        prior=tensors["prior"],
        calibration=config.get("calibration") or {},
    )
    if profile.head_offsets.dim() == 2 and profile.head_offsets.shape[1] != config["head_dim"]:
        raise ValueError(
            f"{path / WEIGHTS_FILE}: head_offsets has head_dim {profile.head_offsets.shape[1]}, "
            f"the config says {config['head_dim']}"
        )
    profile.validate(model_config, base_model)
    return profile
