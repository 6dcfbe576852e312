"""Run one scheduled step: pack the tokens, call the model, sample where a prompt is done."""

from __future__ import annotations

import torch

from engine.attention_router import AttentionRouter
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
    ) -> None:
        self.model = model
        self.router = router
        self.device = device
        self.lofit = lofit

    @torch.inference_mode()
    def step(
        self, work: list[tuple[Sequence, int]]
    ) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """Run the forward pass for `work`; return (sequence, token, logprob) for each
        sequence whose tokens are now all computed (so it samples its next token)."""
        token_ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        adapter_slots: list[int] = []
        slices: list[SequenceSlice] = []
        for seq, n in work:
            start = seq.num_computed
            slices.append(SequenceSlice(seq.cache, len(token_ids), n, start))
            token_ids.extend(seq.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            seq_lens.extend([start + n] * n)
            adapter_slots.extend([seq.adapter_slot] * n)
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
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, ctx)

        sampling = [
            (i, seq) for i, (seq, n) in enumerate(work) if seq.num_computed + n == seq.num_tokens
        ]
        for seq, n in work:
            seq.num_computed += n
        if not sampling:
            return []
        last = torch.tensor([slices[i].end - 1 for i, _ in sampling], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last)).float()
        tokens, logprobs = sample(logits, [seq.sampling_row() for _, seq in sampling])
        return [(seq, t, lp) for (_, seq), t, lp in zip(sampling, tokens, logprobs, strict=True)]
