"""Our 30-layer default model against transformers' implementation of the same weights."""

from __future__ import annotations

import pytest
import torch

from engine.attention_backend import CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.model_config import ModelConfig
from engine.model_loader import load_model
from engine.models import build_model
from engine.weights import load_safetensors_dir

TOLERANCE = 1e-3  # fp32, 30 layers


@pytest.fixture(scope="module")
def reference(default_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module", params=["dense", "engine"])
def models(request, default_model_dir, reference):
    """Ours with plain dense weights, and as the engine loads it: oneDNN-packed weights
    plus the GGUF's quantisation blocks for few-row products (prefill of 1 token, decode)."""
    if request.param == "dense":
        ours = build_model(ModelConfig.from_dir(default_model_dir))
        ours.load_hf_state_dict(load_safetensors_dir(default_model_dir))
    else:
        ours = load_model(None, block_weights=True).model
        assert ours.pack_weights() > 0
        assert ours.layers[0].qkv_blocks is not None and ours.lm_head_blocks is not None
    return ours.eval(), reference


def _forward(model, backend, cache, ids: list[int]) -> torch.Tensor:
    n_cached = backend.cache_len(cache)
    ctx = ForwardContext([SequenceSlice(cache, 0, len(ids), n_cached)], backend)
    positions = torch.arange(n_cached, n_cached + len(ids))
    return model.compute_logits(model(torch.tensor(ids), positions, ctx))


@pytest.mark.parametrize("prompt_len", [1, 37, 300])
@torch.inference_mode()
def test_prefill_and_greedy_decode_match_transformers(models, prompt_len):
    ours, reference = models
    gen = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(3, ours.config.vocab_size, (prompt_len,), generator=gen).tolist()
    c = ours.config
    backend = FullAttentionBackend(CacheShape(c.num_layers, c.num_kv_heads, c.head_dim))
    cache = backend.new_cache()

    logits = _forward(ours, backend, cache, prompt)
    ref = reference(torch.tensor([prompt]), use_cache=True)
    assert (logits - ref.logits[0]).abs().max().item() < TOLERANCE
    past = ref.past_key_values

    ours_tokens, ref_tokens = [], []
    ours_next = int(logits[-1].argmax())
    ref_next = int(ref.logits[0, -1].argmax())
    for _ in range(20):
        ours_tokens.append(ours_next)
        ref_tokens.append(ref_next)
        step = _forward(ours, backend, cache, [ours_next])[-1]
        ref = reference(torch.tensor([[ref_next]]), past_key_values=past, use_cache=True)
        past = ref.past_key_values
        assert (step - ref.logits[0, -1]).abs().max().item() < TOLERANCE
        ours_next, ref_next = int(step.argmax()), int(ref.logits[0, -1].argmax())
    assert ours_tokens == ref_tokens
