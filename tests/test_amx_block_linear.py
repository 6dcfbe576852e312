"""bf16 rows times 4-bit blocks on AMX tiles (kernels.amx_block_linear), against the
float64 product of the exact weights; and which rows BlockWeight sends there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kernels.thread_split as split
from kernels import amx_block_linear
from kernels.amx_block_linear import AmxWeight
from kernels.block_linear import AMX_MAX_ROWS, AMX_MIN_ROWS, AMX_MIN_ROWS_FLOAT32, BlockWeight

pytestmark = pytest.mark.skipif(
    not amx_block_linear.AVAILABLE, reason="this CPU has no AMX-BF16 tiles (or may not use them)"
)


def _blocks(out: int, inp: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (out, inp)).astype(np.uint8)
    d = rng.random((out, inp // 32), dtype=np.float32) * 1e-2
    return q, d, -rng.random((out, inp // 32), dtype=np.float32) * 5e-2


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out, inp", [(960, 576), (576, 1536), (32, 64)])
def test_product_is_the_exact_weights_product_rounded_once(out, inp, threads, monkeypatch):
    """Any row count (padded to 16, and more than one tile pass), split across threads or
    not: within one bf16 ulp of the exact product everywhere, half an ulp on average, and
    closer than the dense path, which multiplies by the bf16-rounded weights."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(split, "SPLIT_WORK", threads > 1)
    monkeypatch.setattr(amx_block_linear, "MIN_GROUPS_PER_THREAD", 1)
    q, d, m = _blocks(out, inp)
    exact = BlockWeight(q, d, m).dequantize()
    weight = AmxWeight(q, d, m)
    for rows in (1, 5, 16, 21):
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows)).bfloat16()
        got = weight.matmul(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, out)
        want = x.double() @ exact.double().T
        error = (got.double() - want).abs()
        assert (error <= want.abs() * 2**-7 + 1e-6).all(), rows
        assert error.mean() < 2**-9 * want.abs().mean(), rows
        dense = torch.nn.functional.linear(x, exact.bfloat16())
        assert error.mean() < (dense.double() - want).abs().mean(), rows


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("out, inp", [(960, 576), (576, 1536)])
def test_float32_rows_are_split_exactly_and_keep_float32_accuracy(out, inp, threads, monkeypatch):
    """float32 x is multiplied as three bf16 planes that sum to it exactly: the product is
    within float32 summation error of the float64 one, like the dense float32 product."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(split, "SPLIT_WORK", threads > 1)
    monkeypatch.setattr(amx_block_linear, "MIN_GROUPS_PER_THREAD", 1)
    q, d, m = _blocks(out, inp)
    exact = BlockWeight(q, d, m).dequantize().double()
    weight = AmxWeight(q, d, m)
    for rows in (1, 5, 16, 21):
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
        got = weight.matmul(x)
        assert got.dtype == torch.float32 and got.shape == (rows, out)
        want = x.double() @ exact.T
        assert (got.double() - want).abs().max() < 2e-6 * want.abs().max(), rows
    tiny = torch.full((1, inp), 1e-30)  # remainders that underflow bf16 only lose them
    assert torch.allclose(weight.matmul(tiny).double(), tiny.double() @ exact.T, rtol=1e-4)


def test_block_weight_sends_4_to_16_bf16_rows_to_amx():
    from engine.models.linear import linear

    q, d, m = _blocks(96, 64)
    weight = BlockWeight(q, d, m)
    assert weight.max_rows(torch.bfloat16) == AMX_MAX_ROWS
    assert weight.amx(torch.bfloat16) is weight.amx(torch.float32) is not None  # one layout
    dense = weight.dequantize().bfloat16()
    for rows in (AMX_MIN_ROWS, AMX_MAX_ROWS):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.equal(linear(x, dense, None, weight), weight.amx(torch.bfloat16).matmul(x))
    few = torch.randn(AMX_MIN_ROWS - 1, 64).bfloat16()  # torch's int4 product
    int4 = weight.torch_int4(torch.bfloat16)
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(few, int4[0], 32, int4[1])
    assert torch.equal(weight.matmul(few), want)
    many = torch.randn(AMX_MAX_ROWS + 1, 64).bfloat16()
    assert torch.equal(linear(many, dense, None, weight), torch.nn.functional.linear(many, dense))
    odd = BlockWeight(*_blocks(100, 64))  # not a whole tile of columns: not for AMX
    assert odd.amx(torch.bfloat16) is None


def test_block_weight_sends_float32_batches_to_amx():
    from engine.models.linear import linear

    weight = BlockWeight(*_blocks(96, 64))
    assert weight.max_rows(torch.float32) == AMX_MAX_ROWS
    dense = weight.dequantize()
    for rows in (AMX_MIN_ROWS_FLOAT32, AMX_MAX_ROWS):
        x = torch.randn(rows, 64)
        assert torch.equal(linear(x, dense, None, weight), weight.amx(torch.float32).matmul(x))
    one = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))  # one-row kernel
    assert not torch.equal(weight.matmul(one), weight.amx(torch.float32).matmul(one))
    assert torch.allclose(weight.matmul(one), weight.amx(torch.float32).matmul(one), atol=1e-5)
    many = torch.randn(AMX_MAX_ROWS + 1, 64)
    assert torch.equal(linear(many, dense, None, weight), torch.nn.functional.linear(many, dense))


def test_bad_shapes_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="16"):
        AmxWeight(*_blocks(100, 64))
    weight = AmxWeight(*_blocks(32, 64))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        weight.matmul(torch.zeros(2, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        weight.matmul(torch.zeros(2, 32).bfloat16())


def test_8bit_blocks_take_float32_rows_on_two_tiles():
    """8-bit blocks (w = d * q, q int8) with float32 rows: within float32 summation error
    of the exact product; bf16 rows of them stay on the dense weights (faster there)."""
    from engine.models.linear import linear
    from kernels.block_linear import AMX_MIN_ROWS_8BIT, MAX_ROWS

    rng = np.random.default_rng(3)
    q = rng.integers(-128, 128, (96, 64)).astype(np.int8)
    d = rng.random((96, 2), dtype=np.float32) * 1e-3
    weight = BlockWeight(q, d)
    exact = weight.dequantize()
    assert weight.amx_rows(torch.float32) == (AMX_MIN_ROWS_8BIT, AMX_MAX_ROWS)
    assert weight.amx_rows(torch.bfloat16) is None
    assert weight.max_rows(torch.bfloat16) == MAX_ROWS
    for rows in (AMX_MIN_ROWS_8BIT, 16, 21):
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        got = AmxWeight(q, d).matmul(x)
        want = x.double() @ exact.double().T
        assert (got.double() - want).abs().max() < 2e-6 * want.abs().max(), rows
        if rows <= AMX_MAX_ROWS:
            assert torch.equal(linear(x, exact, None, weight), got)
        bf16 = AmxWeight(q, d).matmul(x.bfloat16())
        want = x.bfloat16().double() @ exact.double().T
        assert ((bf16.double() - want).abs() <= want.abs() * 2**-7 + 1e-6).all(), rows
