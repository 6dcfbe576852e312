"""What the decode products' numerics cost: teacher-forced decode, one token a step (so
every product takes the few-row path a real decode step takes), over 20 passages that
ship with Python, for each product path of the default model:

- float32, the GGUF's blocks in float32 (the exact weights; the reference),
- bfloat16 through the VNNI product (rows quantised to int8 per block, as llama.cpp),
- bfloat16 through torch's int4 product (rows unquantised),

printing each path's perplexity, its next-token agreement with the reference and its
mean |logit - reference logit|. Usage:

    .venv/bin/python benchmarks/decode_nll.py [--passages 20] [--max-tokens 200]
"""

from __future__ import annotations

import engine  # noqa: F401  (the server's thread settings, before torch loads)

# isort: split
import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import kernels.block_linear as block_linear
import kernels.vnni_block_linear as vnni_block_linear
from engine.model_files import default_model_dir
from engine.model_loader import load_model
from engine.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from anchored_bias import passages  # noqa: E402
from tiered_decode import forward, make_backend  # noqa: E402

PATHS = {  # name: (dtype, VNNI on)
    "float32 blocks (reference)": (torch.float32, False),
    "bfloat16, VNNI": (torch.bfloat16, True),
    "bfloat16, torch int4": (torch.bfloat16, False),
}


@torch.inference_mode()
def decode_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids) - 1, vocab] of each next token, one decode step each."""
    backend = make_backend("full", model, 100, "exact")
    cache = backend.new_cache()
    rows = []
    for token in ids[:-1]:
        rows.append(forward(model, backend, [cache], [[token]]).float()[-1])
    backend.free(cache)
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passages", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    tokenizer = load_tokenizer(default_model_dir())
    texts = [tokenizer.encode(t)[: args.max_tokens] for t in passages()[: args.passages]]
    logits: dict[str, list[torch.Tensor]] = {}
    for name, (dtype, vnni) in PATHS.items():
        if vnni and not vnni_block_linear.AVAILABLE:
            print(f"{name}: not measured, this CPU has no AVX512-VNNI")
            continue
        block_linear.VNNI = vnni
        model = load_model(None, dtype, block_weights=True).model
        model.pack_weights()
        logits[name] = [decode_logits(model, ids) for ids in tqdm(texts, desc=name)]
    reference = logits["float32 blocks (reference)"]
    print(f"{len(texts)} passages, {sum(len(t) - 1 for t in texts)} decode steps each path\n")
    print("| path | perplexity | next token = reference's | mean abs logit diff |")
    print("|---|---:|---:|---:|")
    for name, per_text in logits.items():
        nll, count, same, diff = 0.0, 0, 0, 0.0
        for ids, got, ref in zip(texts, per_text, reference, strict=True):
            targets = torch.tensor(ids[1:])
            nll += torch.nn.functional.cross_entropy(got, targets, reduction="sum").item()
            count += len(targets)
            same += (got.argmax(-1) == ref.argmax(-1)).sum().item()
            diff += (got - ref).abs().mean(-1).sum().item()
        print(f"| {name} | {math.exp(nll / count):.3f} | {same / count:.4f} | {diff / count:.4f} |")


if __name__ == "__main__":
    main()
