"""Run one scheduled step: pack the tokens, call the model, sample where a prompt is done."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.attention_router import AttentionRouter
from engine.bias_bank import BiasBank
from engine.forward_context import ForwardContext, SequenceSlice
from engine.lofit_bank import LofitBank
from engine.model_config import ModelConfig
from engine.models import CausalLM
from engine.sampler import TokenLogprob, sample
from engine.sequence import Sequence
from engine.thread_tuner import ThreadTuner

# Weight bytes up to which a lone sequence's decode step runs on one thread by default.
# Such a step is ~500 small ops; each one spread over threads hands work across cores
# and waits for it, which costs more than the op saves for a small model.
# benchmarks/lone_decode_threads.py on the 2-core test VM, default model in bf16, all
# threads' time / one thread's, median of 6 interleaved pairs: 1.20x at 512 tokens of
# context (1.03-2.12x), 1.01x at 2048 (0.87-1.47x); one thread is also the steadier.
SINGLE_THREAD_MAX_WEIGHT_BYTES = 1 << 30


def auto_single_decode_threads(
    config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> int:
    """The default thread count for a lone sequence's decode step: 1 for a CPU model of
    at most SINGLE_THREAD_MAX_WEIGHT_BYTES of weights, else 0 (all threads)."""
    if device.type != "cpu":
        return 0
    h, c = config.hidden_size, config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * c.intermediate_size  # gated MLP's 3
    embeddings = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    weight_bytes = (c.num_layers * per_layer + embeddings) * dtype.itemsize
    return 1 if weight_bytes <= SINGLE_THREAD_MAX_WEIGHT_BYTES else 0


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch threads (0 or more than set: unchanged)."""
    before = torch.get_num_threads()
    if count <= 0 or count >= before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelRunner:
    """Owns the model and the attention backends; turns scheduled work into new tokens."""

    def __init__(
        self,
        model: CausalLM,
        router: AttentionRouter,
        device: torch.device,
        lofit: LofitBank | None = None,
        bias: BiasBank | None = None,
        single_decode_threads: int = 0,
        decode_tuner: ThreadTuner | None = None,
    ) -> None:
        self.model = model
        self.router = router
        self.device = device
        self.lofit = lofit
        self.bias = bias
        # Threads for a step that decodes one sequence alone (0: all); the block kernels
        # split their work by torch's thread count, so they follow it too.
        self.single_decode_threads = single_decode_threads
        # Picks one thread or all for steps that decode several sequences (None: all).
        self.decode_tuner = decode_tuner

    @torch.inference_mode()
    def step(
        self, work: list[tuple[Sequence, int]]
    ) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Run the forward pass for `work`; return (sequence, token, logprob) for each
        sequence whose tokens are now all computed (so it samples its next token)."""
        decode = all(n == 1 for _, n in work)
        tuner = self.decode_tuner if decode and len(work) > 1 else None
        threads = self.single_decode_threads if decode and len(work) == 1 else 0
        if tuner is not None:
            kind = tuner.kind(len(work))
            threads = tuner.choose(kind)
        start = time.perf_counter()
        with torch_threads(threads):
            seqs, logits = self.forward_logits(work)
            if not seqs:
                return []
            tokens, logprobs = sample(logits, [seq.sampling_row() for seq in seqs])
        if tuner is not None:
            tuner.record(kind, threads, time.perf_counter() - start, len(work))
        return list(zip(seqs, tokens, logprobs, strict=True))

    @torch.inference_mode()
    def forward_logits(
        self, work: list[tuple[Sequence, int]]
    ) -> tuple[list[Sequence], torch.Tensor]:
        """Run the forward pass for `work`; return the sequences whose tokens are now all
        computed and their next-token logits [B, V] (float32, after any prior correction)."""
        token_ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        adapter_slots: list[int] = []
        bias_slots: list[int] = []
        slices: list[SequenceSlice] = []
        for seq, n in work:
            start = seq.num_computed
            slices.append(SequenceSlice(seq.cache, len(token_ids), n, start))
            token_ids.extend(seq.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            seq_lens.extend([start + n] * n)
            adapter_slots.extend([seq.adapter_slot] * n)
            bias_slots.extend([seq.bias_slot] * n)
        ctx = ForwardContext(
            slices=slices,
            backend=self.router,
            seq_len_per_token=torch.tensor(seq_lens, device=self.device),
        )
        if self.lofit is not None and any(seq.adapter_slot for seq, _ in work):
            ctx.adapter_slots = torch.tensor(adapter_slots, dtype=torch.long, device=self.device)
            hook = self.lofit.hook(ctx)
            if hook is not None:
                ctx.head_output_hooks.append(hook)
        if self.bias is not None and any(seq.bias_slot for seq, _ in work):
            ctx.bias_slots = torch.tensor(bias_slots, dtype=torch.long, device=self.device)
            head_hook, mlp_hook = self.bias.hooks(ctx)
            if head_hook is not None:
                ctx.head_output_hooks.append(head_hook)
            if mlp_hook is not None:
                ctx.mlp_act_hooks.append(mlp_hook)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, ctx)

        sampling = [
            (i, seq) for i, (seq, n) in enumerate(work) if seq.num_computed + n == seq.num_tokens
        ]
        for seq, n in work:
            seq.num_computed += n
        seqs = [seq for _, seq in sampling]
        if not sampling:
            return seqs, hidden.new_empty(0, 0)
        last = torch.tensor([slices[i].end - 1 for i, _ in sampling], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last)).float()
        if self.bias is not None:
            logits = self.bias.adjust_logits(logits, [seq.bias_slot for seq in seqs])
        return seqs, logits
