"""Run one scheduled step: pack the tokens, call the model, sample where a prompt is done."""

from __future__ import annotations

import torch

from engine.attention_router import AttentionRouter
from engine.bias_bank import BiasBank
from engine.forward_context import ForwardContext, SequenceSlice
from engine.lofit_bank import LofitBank
from engine.models import CausalLM
from engine.sampler import TokenLogprob, sample
from engine.sequence import Sequence


class ModelRunner:
    """Owns the model and the attention backends; turns scheduled work into new tokens."""

    def __init__(
        self,
        model: CausalLM,
        router: AttentionRouter,
        device: torch.device,
        lofit: LofitBank | None = None,
        bias: BiasBank | None = None,
    ) -> None:
        self.model = model
        self.router = router
        self.device = device
        self.lofit = lofit
        self.bias = bias

    @torch.inference_mode()
    def step(
        self, work: list[tuple[Sequence, int]]
    ) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Run the forward pass for `work`; return (sequence, token, logprob) for each
        sequence whose tokens are now all computed (so it samples its next token)."""
        seqs, logits = self.forward_logits(work)
        if not seqs:
            return []
        tokens, logprobs = sample(logits, [seq.sampling_row() for seq in seqs])
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
