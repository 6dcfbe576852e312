"""The compiled decode-sized RMSNorm (kernels.rms_norm) against transformers' LlamaRMSNorm
formula in torch, and the model's dispatch between the two."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.llama import rms_norm
from kernels.rms_norm import NORM_MAX_ROWS, rms_norm_rows


def _torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: statistics in float32, the normalised row in x's dtype, then scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _inputs(rows: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 576, generator=gen) * 3).to(dtype)
    weight = (torch.rand(576, generator=gen) + 0.5).to(dtype)
    return x, weight


@pytest.mark.parametrize("rows", [1, 3, 4, 16, NORM_MAX_ROWS])
def test_bfloat16_is_bit_identical_to_the_torch_formula(rows):
    x, weight = _inputs(rows, torch.bfloat16, seed=rows)
    got = rms_norm_rows(x, weight, 1e-5)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, _torch_rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("rows", [1, 4, NORM_MAX_ROWS])
def test_float32_matches_to_float32_rounding(rows):
    x, weight = _inputs(rows, torch.float32, seed=rows)
    want = _torch_rms_norm(x.double(), weight.double(), 1e-5)
    got = rms_norm_rows(x, weight, 1e-5)
    assert (got.double() - want).abs().max() < 1e-6 * want.abs().max()


def test_refuses_mixed_or_other_dtypes():
    x, weight = _inputs(1, torch.float32)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm_rows(x, weight.bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        rms_norm_rows(x.double(), weight.double(), 1e-5)


def test_model_uses_it_for_decode_sized_inputs_and_torch_otherwise():
    x, weight = _inputs(NORM_MAX_ROWS, torch.bfloat16)
    assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm_rows(x, weight, 1e-5))
    many, weight32 = _inputs(NORM_MAX_ROWS + 1, torch.float32)
    assert torch.equal(rms_norm(many, weight32, 1e-5), F.rms_norm(many, (576,), weight32, 1e-5))
    trained = many[:2].clone().requires_grad_()
    out = rms_norm(trained, weight32, 1e-5)
    assert out.grad_fn is not None  # torch's path, differentiable (LoFiT training)
