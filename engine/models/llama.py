"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, GQA, SwiGLU.

q/k/v and gate/up projections are concatenated at load time, so a layer runs four matmuls
where transformers runs seven.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import ForwardContext
from engine.model_config import ModelConfig
from engine.models import ACTIVATIONS, CausalLM, copy_param, empty_param, take_weights
from engine.models.linear import (
    PACK_BATCH_HINT,
    can_pack,
    decode_sized,
    linear,
    pack_linear_weights,
    residual_linear,
)
from engine.models.rope import RotaryEmbedding, apply_rotary
from kernels.block_linear import BlockWeight
from kernels.rms_norm import NORM_DTYPES, NORM_MAX_ROWS, rms_norm_rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, scale in the model dtype."""
    if (
        x.dim() == 2
        and x.device.type == "cpu"
        and x.dtype in NORM_DTYPES
        and weight.dtype == x.dtype
        and decode_sized(x, NORM_MAX_ROWS)
    ):
        return rms_norm_rows(x.detach(), weight.detach(), eps)  # decode: one call, not 2-6
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm block: attention through the backend, then the gated MLP."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.intermediate_size = c.intermediate_size
        self.eps = c.norm_eps
        self.scale = c.head_dim**-0.5
        self.act = ACTIVATIONS[c.hidden_act]
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        kw = {"dtype": dtype, "device": device}
        self.input_norm = empty_param(c.hidden_size, **kw)
        self.qkv_weight = empty_param(q_size + 2 * kv_size, c.hidden_size, **kw)
        self.qkv_bias = empty_param(q_size + 2 * kv_size, **kw) if c.qkv_bias else None
        self.o_weight = empty_param(c.hidden_size, q_size, **kw)
        self.o_bias = empty_param(c.hidden_size, **kw) if c.o_bias else None
        self.post_norm = empty_param(c.hidden_size, **kw)
        self.gate_up_weight = empty_param(2 * c.intermediate_size, c.hidden_size, **kw)
        self.gate_up_bias = empty_param(2 * c.intermediate_size, **kw) if c.mlp_bias else None
        self.down_weight = empty_param(c.hidden_size, c.intermediate_size, **kw)
        self.down_bias = empty_param(c.hidden_size, **kw) if c.mlp_bias else None
        # The same weights as quantisation blocks, when the checkpoint has them.
        self.qkv_blocks: BlockWeight | None = None
        self.o_blocks: BlockWeight | None = None
        self.gate_up_blocks: BlockWeight | None = None
        self.down_blocks: BlockWeight | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        t = x.shape[0]
        hq, hkv = self.num_heads, self.num_kv_heads
        h = rms_norm(x, self.input_norm, self.eps)
        qkv = linear(h, self.qkv_weight, self.qkv_bias, self.qkv_blocks)
        qkv = qkv.view(t, hq + 2 * hkv, self.head_dim)
        # q and k heads are adjacent, so one rotation covers both.
        qk = apply_rotary(qkv[:, : hq + hkv], cos, sin)
        out = ctx.backend.forward(
            self.layer_idx, qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :], ctx, self.scale
        )
        for hook in ctx.head_output_hooks:
            out = hook(self.layer_idx, out)
        out = out.reshape(t, hq * self.head_dim)
        x = residual_linear(x, out, self.o_weight, self.o_bias, self.o_blocks)

        h = rms_norm(x, self.post_norm, self.eps)
        gate_up = linear(h, self.gate_up_weight, self.gate_up_bias, self.gate_up_blocks)
        n = self.intermediate_size
        act = self.act(gate_up[:, :n]) * gate_up[:, n:]
        for hook in ctx.mlp_act_hooks:
            act = hook(self.layer_idx, act)
        return residual_linear(x, act, self.down_weight, self.down_bias, self.down_blocks)

    def load(self, w: dict[str, torch.Tensor], prefix: str) -> None:
        """Fill the layer from HF-named tensors `{prefix}self_attn.q_proj.weight`, ..."""
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        copy_param(self.input_norm, w[prefix + "input_layernorm.weight"], "input_layernorm")
        copy_param(self.post_norm, w[prefix + "post_attention_layernorm.weight"], "post_norm")
        qkv = [w[f"{attn}{p}_proj.weight"] for p in "qkv"]
        copy_param(self.qkv_weight, torch.cat(qkv, 0), attn + "q/k/v_proj.weight")
        copy_param(self.o_weight, w[attn + "o_proj.weight"], attn + "o_proj.weight")
        gate_up = [w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]
        copy_param(self.gate_up_weight, torch.cat(gate_up, 0), mlp + "gate/up_proj.weight")
        copy_param(self.down_weight, w[mlp + "down_proj.weight"], mlp + "down_proj.weight")
        if self.qkv_bias is not None:
            qkv_b = torch.cat([w[f"{attn}{p}_proj.bias"] for p in "qkv"], 0)
            copy_param(self.qkv_bias, qkv_b, attn + "q/k/v_proj.bias")
        if self.o_bias is not None:
            copy_param(self.o_bias, w[attn + "o_proj.bias"], attn + "o_proj.bias")
        if self.gate_up_bias is not None:
            gate_up_b = torch.cat([w[mlp + "gate_proj.bias"], w[mlp + "up_proj.bias"]], 0)
            copy_param(self.gate_up_bias, gate_up_b, mlp + "gate/up_proj.bias")
            copy_param(self.down_bias, w[mlp + "down_proj.bias"], mlp + "down_proj.bias")

    def use_blocks(self, blocks: dict[str, BlockWeight], prefix: str) -> int:
        """Take this layer's block weights from HF-named `blocks`; returns how many."""
        attn, mlp = prefix + "self_attn.", prefix + "mlp."

        def fused(names: list[str]) -> BlockWeight | None:
            parts = [blocks.get(n) for n in names]
            if None in parts:
                return None
            return parts[0] if len(parts) == 1 else BlockWeight.concat(parts)

        self.qkv_blocks = fused([f"{attn}{p}_proj.weight" for p in "qkv"])
        self.o_blocks = fused([attn + "o_proj.weight"])
        self.gate_up_blocks = fused([mlp + "gate_proj.weight", mlp + "up_proj.weight"])
        self.down_blocks = fused([mlp + "down_proj.weight"])
        found = (self.qkv_blocks, self.o_blocks, self.gate_up_blocks, self.down_blocks)
        return sum(b is not None for b in found)

    def hf_keys(self, prefix: str) -> set[str]:
        """The HF checkpoint keys this layer reads."""
        keys = {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
        attn = [f"self_attn.{p}_proj" for p in "qkvo"]
        mlp = [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
        keys |= {f"{prefix}{m}.weight" for m in attn + mlp}
        if self.qkv_bias is not None:
            keys |= {f"{prefix}self_attn.{p}_proj.bias" for p in "qkv"}
        if self.o_bias is not None:
            keys.add(prefix + "self_attn.o_proj.bias")
        if self.gate_up_bias is not None:
            keys |= {f"{prefix}{m}.bias" for m in mlp}
        return keys


class LlamaForCausalLM(CausalLM):
    """Llama-architecture causal LM over packed batches."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> None:
        super().__init__()
        if config.architecture != "llama" or config.rope is None:
            raise ValueError(f"LlamaForCausalLM cannot run a {config.model_type!r} config")
        self.config = config
        kw = {"dtype": dtype, "device": device}
        self.embed_tokens = empty_param(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, device) for i in range(config.num_layers)
        )
        self.norm = empty_param(config.hidden_size, **kw)
        if config.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = empty_param(config.vocab_size, config.hidden_size, **kw)
        self.lm_head_packed: torch.Tensor | None = None
        self.lm_head_blocks: BlockWeight | None = None
        self.rotary = RotaryEmbedding(
            config.rope, config.head_dim, config.max_position_embeddings, dtype, device
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and positions must both be [T], got {tuple(input_ids.shape)} "
                f"and {tuple(positions.shape)}"
            )
        x = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary(positions, ctx.seq_len_per_token)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return rms_norm(x, self.norm, self.config.norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.lm_head if self.lm_head_packed is None else self.lm_head_packed
        return linear(hidden, head, None, self.lm_head_blocks)

    def use_block_weights(self, blocks: dict[str, BlockWeight]) -> int:
        """Multiply few-row inputs from these HF-named block weights (equal to the dense
        ones, see engine.gguf_blocks); returns how many matmul weights have blocks."""
        count = sum(
            layer.use_blocks(blocks, f"model.layers.{i}.") for i, layer in enumerate(self.layers)
        )
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        self.lm_head_blocks = blocks.get(head)
        return count + (self.lm_head_blocks is not None)

    def pack_weights(self) -> int:
        """Pre-pack the matmul weights for CPU decode (see engine.models.linear), and the
        quantisation blocks for the VNNI, torch's int4 and the AMX products where this dtype
        takes them (0.2 s and 0.3 s for the default model in bf16, else paid by the first
        request).

        The embedding table stays dense for lookups; the LM head gets a packed copy.
        """
        count = 0
        for layer in self.layers:
            dtype = layer.input_norm.dtype
            for blocks in (layer.qkv_blocks, layer.o_blocks, layer.gate_up_blocks,
                           layer.down_blocks):  # fmt: skip
                if blocks is not None:
                    blocks.vnni(dtype)
                    blocks.torch_int4(dtype)
                    blocks.amx(dtype)
            count += pack_linear_weights(
                layer, ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")
            )
        if self.lm_head_blocks is not None:
            self.lm_head_blocks.amx(self.lm_head.dtype)
        if can_pack(self.lm_head):
            self.lm_head_packed = torch.ops.mkldnn._reorder_linear_weight(
                self.lm_head.detach(), PACK_BATCH_HINT
            )
            count += 1
        return count

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"embed_tokens.weight", "norm.weight"}
        for i, layer in enumerate(self.layers):
            expected |= layer.hf_keys(f"layers.{i}.")
        tied = self.config.tie_word_embeddings
        if not tied:
            expected.add("lm_head.weight")

        def ignored(name: str) -> bool:
            return name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")

        w = take_weights(state, expected, ignored, strip_prefixes=("model.",))
        copy_param(self.embed_tokens, w["embed_tokens.weight"], "embed_tokens.weight")
        copy_param(self.norm, w["norm.weight"], "norm.weight")
        if not tied:
            copy_param(self.lm_head, w["lm_head.weight"], "lm_head.weight")
        for i, layer in enumerate(self.layers):
            layer.load(w, f"layers.{i}.")
