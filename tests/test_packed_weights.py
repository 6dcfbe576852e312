"""oneDNN-packed matmul weights compute the same logits as dense ones."""

from __future__ import annotations

import pytest
import torch

from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.model_config import ModelConfig
from engine.models import build_model
from engine.models.linear import can_pack
from engine.weights import load_safetensors_dir


def _logits(model, ids: list[int]) -> torch.Tensor:
    backend = FullAttentionBackend(model.cache_shape())
    cache = backend.new_cache()
    out = []
    with torch.inference_mode():
        prefill = ForwardContext([SequenceSlice(cache, 0, len(ids) - 3, 0)], backend)
        hidden = model(torch.tensor(ids[:-3]), torch.arange(len(ids) - 3), prefill)
        out.append(model.compute_logits(hidden))
        for i in range(len(ids) - 3, len(ids)):  # three decode steps
            ctx = ForwardContext([SequenceSlice(cache, 0, 1, i)], backend)
            out.append(model.compute_logits(model(torch.tensor([ids[i]]), torch.tensor([i]), ctx)))
    return torch.cat(out)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "default_model_dir"])
def test_packed_and_dense_weights_give_the_same_logits(request, fixture):
    model_dir = request.getfixturevalue(fixture)
    config = ModelConfig.from_dir(model_dir)
    state = load_safetensors_dir(model_dir)
    dense, packed = build_model(config), build_model(config)
    dense.load_hf_state_dict(state)
    packed.load_hf_state_dict(state)
    assert can_pack(dense.layers[0].qkv_weight)
    assert packed.pack_weights() == 4 * config.num_layers + 1
    assert packed.layers[0].qkv_weight.is_mkldnn
    ids = torch.randint(3, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    want, got = _logits(dense, ids.tolist()), _logits(packed, ids.tolist())
    assert (want - got).abs().max().item() < 1e-3
    assert torch.equal(want.argmax(-1), got.argmax(-1))
