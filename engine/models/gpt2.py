"""GPT-2: learned positions, LayerNorm, fused qkv (HF Conv1D weights transposed at load)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import ForwardContext
from engine.model_config import ModelConfig
from engine.models import ACTIVATIONS, CausalLM, copy_param, empty_param, take_weights
from engine.models.linear import linear, pack_linear_weights


class GPT2Block(nn.Module):
    """One pre-LayerNorm block: attention through the backend, then the GELU MLP."""

    # (our parameter, HF Conv1D/LayerNorm name, transpose at load)
    _WEIGHTS = (
        ("ln1_weight", "ln_1.weight", False),
        ("ln1_bias", "ln_1.bias", False),
        ("qkv_weight", "attn.c_attn.weight", True),
        ("qkv_bias", "attn.c_attn.bias", False),
        ("o_weight", "attn.c_proj.weight", True),
        ("o_bias", "attn.c_proj.bias", False),
        ("ln2_weight", "ln_2.weight", False),
        ("ln2_bias", "ln_2.bias", False),
        ("fc_weight", "mlp.c_fc.weight", True),
        ("fc_bias", "mlp.c_fc.bias", False),
        ("proj_weight", "mlp.c_proj.weight", True),
        ("proj_bias", "mlp.c_proj.bias", False),
    )

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.hidden_size, self.eps = c.hidden_size, c.norm_eps
        self.act = ACTIVATIONS[c.hidden_act]
        scale = c.head_dim**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale
        d, i = c.hidden_size, c.intermediate_size
        kw = {"dtype": dtype, "device": device}
        self.ln1_weight, self.ln1_bias = empty_param(d, **kw), empty_param(d, **kw)
        self.qkv_weight, self.qkv_bias = empty_param(3 * d, d, **kw), empty_param(3 * d, **kw)
        self.o_weight, self.o_bias = empty_param(d, d, **kw), empty_param(d, **kw)
        self.ln2_weight, self.ln2_bias = empty_param(d, **kw), empty_param(d, **kw)
        self.fc_weight, self.fc_bias = empty_param(i, d, **kw), empty_param(i, **kw)
        self.proj_weight, self.proj_bias = empty_param(d, i, **kw), empty_param(d, **kw)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t, d = x.shape
        h = F.layer_norm(x, (d,), self.ln1_weight, self.ln1_bias, self.eps)
        qkv = linear(h, self.qkv_weight, self.qkv_bias).view(t, 3, self.num_heads, self.head_dim)
        out = ctx.backend.forward(self.layer_idx, qkv[:, 0], qkv[:, 1], qkv[:, 2], ctx, self.scale)
        for hook in ctx.head_output_hooks:
            out = hook(self.layer_idx, out)
        x = x + linear(out.reshape(t, d), self.o_weight, self.o_bias)

        h = F.layer_norm(x, (d,), self.ln2_weight, self.ln2_bias, self.eps)
        act = self.act(linear(h, self.fc_weight, self.fc_bias))
        for hook in ctx.mlp_act_hooks:
            act = hook(self.layer_idx, act)
        return x + linear(act, self.proj_weight, self.proj_bias)

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        """Fill the block from HF-named tensors `{prefix}attn.c_attn.weight`, ..."""
        for ours, theirs, transpose in self._WEIGHTS:
            value = w[prefix + theirs]
            copy_param(getattr(self, ours), value.t() if transpose else value, prefix + theirs)

    @classmethod
    def hf_keys(cls, prefix: str) -> set[str]:
        """The HF checkpoint keys a block reads."""
        return {prefix + theirs for _, theirs, _ in cls._WEIGHTS}


class GPT2LMHeadModel(CausalLM):
    """GPT-2 causal LM over packed batches."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> None:
        super().__init__()
        if config.architecture != "gpt2":
            raise ValueError(f"GPT2LMHeadModel cannot run a {config.model_type!r} config")
        self.config = config
        kw = {"dtype": dtype, "device": device}
        self.wte = empty_param(config.vocab_size, config.hidden_size, **kw)
        self.wpe = empty_param(config.max_position_embeddings, config.hidden_size, **kw)
        self.blocks = nn.ModuleList(
            GPT2Block(config, i, dtype, device) for i in range(config.num_layers)
        )
        self.ln_f_weight = empty_param(config.hidden_size, **kw)
        self.ln_f_bias = empty_param(config.hidden_size, **kw)
        if config.tie_word_embeddings:
            self.lm_head = self.wte
        else:
            self.lm_head = empty_param(config.vocab_size, config.hidden_size, **kw)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be [T], got {tuple(input_ids.shape)} "
                f"and {tuple(positions.shape)}"
            )
        limit = self.config.max_position_embeddings
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(f"position {int(positions.max())} exceeds GPT-2's {limit} positions")
        x = F.embedding(input_ids, self.wte) + F.embedding(positions, self.wpe)
        for block in self.blocks:
            x = block(x, ctx)
        return F.layer_norm(
            x, (x.shape[-1],), self.ln_f_weight, self.ln_f_bias, self.config.norm_eps
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)

    def pack_weights(self) -> int:
        """Pre-pack the blocks' matmul weights for CPU decode (see engine.models.linear)."""
        names = ("qkv_weight", "o_weight", "fc_weight", "proj_weight")
        return sum(pack_linear_weights(block, names) for block in self.blocks)

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
        for i in range(len(self.blocks)):
            expected |= GPT2Block.hf_keys(f"h.{i}.")
        tied = self.config.tie_word_embeddings
        if not tied:
            expected.add("lm_head.weight")

        def ignored(name: str) -> bool:
            buffer = name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")
            return buffer or (tied and name == "lm_head.weight")

        w = take_weights(state, expected, ignored, strip_prefixes=("transformer.",))
        copy_param(self.wte, w["wte.weight"], "wte.weight")
        copy_param(self.wpe, w["wpe.weight"], "wpe.weight")
        copy_param(self.ln_f_weight, w["ln_f.weight"], "ln_f.weight")
        copy_param(self.ln_f_bias, w["ln_f.bias"], "ln_f.bias")
        if not tied:
            copy_param(self.lm_head, w["lm_head.weight"], "lm_head.weight")
        for i, block in enumerate(self.blocks):
            block.load(w, f"h.{i}.")
