"""Model geometry and RoPE settings, normalised from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# model_type -> our architecture family
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
SUPPORTED_ACTIVATIONS = (
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "relu",
)

# transformers' defaults for keys an older config.json may omit
_LLAMA_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None},
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings (transformers' `rope_parameters`, standardised)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    @staticmethod
    def from_hf_dict(d: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
        """Parse new-style `rope_parameters` or old-style `rope_theta` + `rope_scaling`."""
        params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        original = d.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings"
        )
        if original is None and rope_type in ("llama3", "yarn"):
            original = max_position_embeddings
        factor = params.get("factor")
        if rope_type == "yarn" and factor is None:
            factor = max_position_embeddings / original
        rope = RopeConfig(
            rope_type=rope_type,
            theta=float(theta),
            factor=None if factor is None else float(factor),
            original_max_position_embeddings=None if original is None else int(original),
            low_freq_factor=params.get("low_freq_factor"),
            high_freq_factor=params.get("high_freq_factor"),
            attention_factor=params.get("attention_factor"),
            beta_fast=params.get("beta_fast"),
            beta_slow=params.get("beta_slow"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
        )
        rope.validate()
        return rope

    def validate(self) -> None:
        """Raise ValueError when a field the RoPE type needs is missing."""
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE type {self.rope_type!r}")
        needed = {
            "default": (),
            "linear": ("factor",),
            "dynamic": ("factor",),
            "yarn": ("factor", "original_max_position_embeddings"),
            "llama3": (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ),
        }[self.rope_type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"RoPE type {self.rope_type!r} needs {', '.join(missing)}")


@dataclass(frozen=True)
class ModelConfig:
    """What our model implementations need to know about a checkpoint."""

    architecture: str  # "llama" or "gpt2"
    model_type: str  # the checkpoint's own model_type (llama, mistral, qwen2, gpt2)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float  # rms_norm_eps (llama) or layer_norm_epsilon (gpt2)
    max_position_embeddings: int
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope: RopeConfig | None = None  # None for learned positions (gpt2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # recorded only; attention is always full
    scale_attn_weights: bool = True  # gpt2
    scale_attn_by_inverse_layer_idx: bool = False  # gpt2
    torch_dtype: str | None = None  # the checkpoint's dtype as written in config.json

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @staticmethod
    def from_hf_dict(d: dict[str, Any]) -> ModelConfig:
        """Normalise a Hugging Face `config.json` dict."""
        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if ARCHITECTURES[model_type] == "gpt2":
            cfg = _gpt2_config(d)
        else:
            cfg = _llama_config(d, model_type)
        cfg.validate()
        return cfg

    @staticmethod
    def from_dir(path: str | Path) -> ModelConfig:
        """Read `config.json` from a local model directory."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ValueError(f"no config.json in {path}")
        return ModelConfig.from_hf_dict(json.loads(file.read_text()))

    def validate(self) -> None:
        """Raise ValueError on inconsistent geometry."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be positive and even, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}")


def _required(d: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _llama_config(d: dict[str, Any], model_type: str) -> ModelConfig:
    _required(
        d,
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    defaults = _LLAMA_DEFAULTS[model_type]
    heads = int(d["num_attention_heads"])
    max_pos = int(d.get("max_position_embeddings") or defaults["max_position_embeddings"])
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
        sliding = d.get("sliding_window") if d.get("use_sliding_window") else None
    elif model_type == "mistral":
        qkv_bias = o_bias = mlp_bias = False
        sliding = d.get("sliding_window")
    else:
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
        mlp_bias = bool(d.get("mlp_bias", False))
        sliding = None
    return ModelConfig(
        architecture="llama",
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        hidden_act=d.get("hidden_act", "silu"),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        rope=RopeConfig.from_hf_dict(d, max_pos),
        bos_token_id=d.get("bos_token_id", defaults["bos_token_id"]),
        eos_token_ids=_eos_ids(d.get("eos_token_id", defaults["eos_token_id"])),
        sliding_window=sliding,
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
    )


def _gpt2_config(d: dict[str, Any]) -> ModelConfig:
    _required(d, "vocab_size", "n_embd", "n_layer", "n_head")
    hidden, heads = int(d["n_embd"]), int(d["n_head"])
    if hidden % heads:
        raise ValueError(f"n_embd ({hidden}) must be divisible by n_head ({heads})")
    return ModelConfig(
        architecture="gpt2",
        model_type="gpt2",
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d.get("n_inner") or 4 * hidden),
        num_layers=int(d["n_layer"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(d.get("n_positions", 1024)),
        hidden_act=d.get("activation_function", "gelu_new"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        rope=None,
        bos_token_id=d.get("bos_token_id", 50256),
        eos_token_ids=_eos_ids(d.get("eos_token_id", 50256)),
        scale_attn_weights=bool(d.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(d.get("scale_attn_by_inverse_layer_idx", False)),
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
    )
