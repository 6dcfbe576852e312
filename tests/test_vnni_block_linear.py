"""The VNNI product of 4-bit blocks (kernels.vnni_block_linear) against float64
references: exactly the product of the weights with the block-quantised rows, and within
the quantisation's own error bound of the exact product. Needs a CPU with AVX512-VNNI
(the test machine has it); on one without, the product is never used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels.block_linear as block_linear
from kernels.block_linear import BlockWeight
from kernels.vnni_block_linear import AVAILABLE, rows_vnni, vnni_layout

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="this CPU has no AVX512-VNNI")


def _q4_weight(out: int, inp: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Q4_1-like blocks whose scales are float16 values, as GGUF's are."""
    rng = np.random.default_rng(seed)
    blocks = (out, inp // 32)
    q = rng.integers(0, 16, (out, inp)).astype(np.uint8)
    d = (rng.random(blocks) * 1e-2).astype(np.float16).astype(np.float32)
    m = (-rng.random(blocks) * 5e-2).astype(np.float16).astype(np.float32)
    return q, d, m


def _quantised(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(xq, s) as the kernel makes them, in float32: s = max|x_b| / 127 and
    xq = rint(x * (127 / max|x_b|)) per block of 32."""
    xb = x.float().numpy().reshape(x.shape[0], -1, 32)
    top = np.abs(xb).max(-1)
    scale = top / np.float32(127)
    inverse = np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0).astype(np.float32)
    return np.rint(xb * inverse[..., None]), scale


def _product(layout, x: torch.Tensor) -> np.ndarray:
    y = np.empty((x.shape[0], layout[1].shape[0] * 16), np.float32)
    rows = x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    rows_vnni(*layout, rows, y)
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out, inp", [(960, 576), (576, 1536), (16, 32)])
def test_product_of_the_weights_and_the_quantised_rows(out, inp, dtype):
    q, d, m = _q4_weight(out, inp)
    layout = vnni_layout(q, d, m)
    w = (q.reshape(out, -1, 32) * d[..., None] + m[..., None]).astype(np.float64)
    for rows in (1, 3, 8):
        gen = torch.Generator().manual_seed(rows)
        x = (torch.randn(rows, inp, generator=gen) * 3).to(dtype)
        xq, scale = _quantised(x)
        # the weights times s * xq, block by block, in float64
        want = np.einsum("obi,rbi->ro", w, xq * scale[..., None].astype(np.float64))
        got = _product(layout, x)
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max(), rows
        # and within the quantisation's bound of the exact product: |x - s xq| <= s / 2
        exact = x.double().numpy() @ w.reshape(out, inp).T
        bound = np.abs(w).reshape(out, -1, 32).sum(-1) @ (scale.T.astype(np.float64) / 2)
        assert (np.abs(got - exact) <= bound.T + 1e-5 * np.abs(exact).max()).all(), rows


def _q8_weight(out: int, inp: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Q8_0-like blocks: w = d * q, q int8, d a float16 value."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (out, inp)).astype(np.int8)
    d = (rng.random((out, inp // 32)) * 1e-2).astype(np.float16).astype(np.float32)
    return q, d, np.zeros_like(d)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_8bit_product_and_the_thread_split(parts, monkeypatch):
    """8-bit blocks (stored as q + 128, the offset taken out through m): the weights
    times the quantised rows, whatever the split of the tiles across threads."""
    import kernels.thread_split as split

    monkeypatch.setattr(split, "SPLIT_WORK", True)
    q, d, m = _q8_weight(96, 64)
    layout = vnni_layout(q, d, m)
    w = (q.reshape(96, -1, 32).astype(np.float64) * d[..., None]).reshape(96, 64)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    xq, scale = _quantised(x)
    want = np.einsum("obi,rbi->ro", w.reshape(96, -1, 32), xq * scale[..., None])
    y = np.empty((3, 96), np.float32)
    rows_vnni(*layout, x.view(torch.uint16).numpy(), y, parts)
    assert np.abs(y - want).max() < 1e-5 * np.abs(want).max()


def test_a_block_of_zeros_and_a_lone_large_value():
    q, d, m = _q4_weight(32, 96, seed=1)
    layout = vnni_layout(q, d, m)
    x = torch.zeros(2, 96)
    x[1, 40] = 1e4  # one block's scale set by one value; the other blocks all zero
    w = (q.reshape(32, -1, 32) * d[..., None] + m[..., None]).reshape(32, 96).astype(np.float64)
    got = _product(layout, x)
    assert np.array_equal(got[0], np.zeros(32, np.float32))
    want = x[1].double().numpy() @ w.T
    assert np.abs(got[1] - want).max() < 1e-5 * np.abs(want).max()


def test_layout_refuses_what_it_cannot_hold():
    q, d, m = _q4_weight(48, 64)
    with pytest.raises(ValueError, match="16k, 32j"):
        vnni_layout(q[:40], d[:40], m[:40])
    with pytest.raises(ValueError, match="float16"):
        vnni_layout(q, d + np.float32(1e-9), m)


def test_block_weight_sends_few_bf16_rows_to_vnni(monkeypatch):
    """bf16 rows up to VNNI_MAX_ROWS of float16-scaled 4-bit blocks take the VNNI product
    (rounded to bf16 once); float32 rows, more rows, and blocks whose scales are not
    float16 values take the other products. (AMX, which takes bf16 rows from
    AMX_MIN_ROWS up where the CPU has it, is off here.)"""
    monkeypatch.setattr(block_linear, "AMX", False)
    q, d, m = _q4_weight(960, 576)
    weight = BlockWeight(q, d, m)
    assert weight.max_rows(torch.bfloat16) == block_linear.VNNI_MAX_ROWS
    assert weight.torch_int4(torch.bfloat16) is None  # not packed for both
    layout = weight.vnni(torch.bfloat16)
    assert weight.vnni(torch.float32) is None
    x = torch.randn(block_linear.VNNI_MAX_ROWS, 576).bfloat16()
    got = weight.matmul(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(_product(layout, x)).bfloat16())
    rough = BlockWeight(q, d + np.float32(1e-9), m)
    assert rough.vnni(torch.bfloat16) is None and rough.torch_int4(torch.bfloat16) is not None


def test_default_model_products_stay_within_two_bf16_ulps(default_model_dir):
    """On the default model's GGUF blocks (4-bit layers, the 8-bit LM head), one bf16
    row's VNNI product is within 2^-7 of the exact weights' product on average (torch's
    int4 product, which reads the rows unquantised: within 2^-8,
    tests/test_block_linear.py)."""
    from engine.model_loader import load_model

    net = load_model(None, torch.bfloat16, block_weights=True).model
    layer = net.layers[0]
    for blocks in (layer.qkv_blocks, layer.down_blocks, net.lm_head_blocks):
        assert blocks.vnni(torch.bfloat16) is not None
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, blocks.in_features, generator=gen).bfloat16()
        exact = x.double() @ blocks.dequantize().double().T
        error = (blocks.matmul(x).double() - exact).abs()
        assert error.mean() < 2**-7 * exact.abs().mean()
