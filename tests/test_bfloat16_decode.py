"""The default model in bfloat16, the dtype of the fast CPU decode paths, end to end:
products from the GGUF's 4-bit blocks (the VNNI product for a row or few where the CPU
has it, else torch's int4 product; AMX tiles for up to 16 where the CPU has them, else
VNNI or int4 up to 8), the dense weights (more rows),
and the decode-attention kernel reading bf16 queries and writing bf16 output. Model
behaviour, on the real model."""

from __future__ import annotations

import kernels.block_linear as block_linear
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels.block_linear import AMX_MAX_ROWS, AMX_MIN_ROWS, TORCH_INT4_MAX_ROWS


def test_bfloat16_model_answers_alone_and_in_batches(default_model_dir):
    llm = LLM(dtype="bfloat16")
    layer = llm.engine.runner.model.layers[0]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(max_tokens=30, temperature=0)
    # decode steps of 1 row take the VNNI (or int4) products, 12 rows AMX (or the dense weights
    # without it), 20 rows the dense weights
    for copies in (1, 12, 20):
        outs = llm.chat([question] * copies, params)
        assert len(outs) == copies
        assert all("Paris" in out.outputs[0].text for out in outs), copies
        if copies == 1:  # the packings (made at load, by pack_weights)
            assert (layer.qkv_blocks._vnni is not None) == block_linear.VNNI
            assert (layer.qkv_blocks._int4 is not None) != block_linear.VNNI
            assert (layer.qkv_blocks._amx is not None) == block_linear.AMX
    assert TORCH_INT4_MAX_ROWS < 12 and block_linear.VNNI_MAX_ROWS < 12
    assert AMX_MIN_ROWS <= 12 <= AMX_MAX_ROWS < 20
