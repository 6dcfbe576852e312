"""Our own model implementations and the interface the engine drives them through."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_backend import CacheShape
from engine.forward_context import ForwardContext
from engine.model_config import ModelConfig


class CausalLM(nn.Module, ABC):
    """A decoder-only LM over packed, ragged batches; attention goes through ctx.backend."""

    config: ModelConfig

    @abstractmethod
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] for packed token ids and positions [T]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] for hidden states [N, hidden]."""

    @abstractmethod
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights from a state dict with Hugging Face key names."""

    def pack_weights(self) -> int:
        """Pre-pack matmul weights for fast CPU products; returns how many were packed."""
        return 0

    def use_block_weights(self, blocks: dict) -> int:
        """Use quantisation-block copies of the matmul weights (kernels.block_linear) for
        few-row products; returns how many weights have them. Default: none."""
        return 0

    def cache_shape(self) -> CacheShape:
        """The KV cache geometry an attention backend needs for this model."""
        p = next(self.parameters())
        c = self.config
        return CacheShape(c.num_layers, c.num_kv_heads, c.head_dim, p.dtype, p.device)


def build_model(
    config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> CausalLM:
    """An uninitialised model of the config's architecture; fill it with load_hf_state_dict."""
    if config.architecture == "llama":
        from engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config, dtype=dtype, device=device)
    if config.architecture == "gpt2":
        from engine.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel(config, dtype=dtype, device=device)
    raise ValueError(f"unsupported architecture {config.architecture!r}")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# gelu_new and gelu_fast are the tanh approximation written out; torch's fused kernel
# agrees with them to float rounding.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
}


def take_weights(
    state: dict[str, torch.Tensor],
    expected: set[str],
    ignored: Callable[[str], bool],
    strip_prefixes: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Normalise HF key names and check them against `expected`, with a clear error."""
    found: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        name = key
        for prefix in strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name in expected:
            found[name] = tensor
        elif not ignored(name):
            unexpected.append(key)
    missing = sorted(expected - found.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        raise ValueError("state dict does not match the model: " + "; ".join(parts))
    return found


def empty_param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    """An uninitialised frozen parameter (weights are filled by load_hf_state_dict)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def copy_param(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    """Copy `value` into `param` (dtype and device converted), checking the shape."""
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"shape mismatch for {name}: checkpoint {tuple(value.shape)}, "
            f"model {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(value)


__all__ = ["ACTIVATIONS", "CausalLM", "build_model", "copy_param", "empty_param", "take_weights"]
