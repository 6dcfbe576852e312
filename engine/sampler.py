"""Pick one next token per running sequence, each row with its own SamplingParams.

Processing order follows vLLM: logit_bias, min_tokens masking of stop/eos ids,
repetition penalty (prompt + output), presence/frequency penalties (output), then greedy
argmax or temperature, top-k, top-p, min-p and a draw. Logprobs are taken from the raw
model logits, before any of that (vLLM's default).

Draws use the exponential-race trick (argmax of p / q with q ~ Exp(1)), which samples from
p exactly; a seeded row draws its q from its own generator, so its tokens do not depend on
which other rows share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

_GREEDY_BELOW = 1e-5  # temperatures this small divide logits into inf; treat them as greedy


@dataclass
class SamplingRow:
    """One running sequence's view for the sampler."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None  # from make_generator(params.seed); None: global RNG
    eos_token_ids: frozenset[int] = frozenset()  # masked, with stop_token_ids, until min_tokens


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top-N alternatives, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded for one sequence (create once, reuse every step); None if no seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator


def sample(
    logits: torch.Tensor, rows: list[SamplingRow]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample one token per row of `logits` [B, V]; also return logprobs where asked.

    The input tensor is never modified.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    if logits.shape[0] != len(rows):
        raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} SamplingRows given")
    if not rows:
        return [], []
    x = process_logits(logits, rows)
    greedy = [r.params.temperature < _GREEDY_BELOW for r in rows]
    if all(greedy):
        tokens = x.argmax(dim=-1)
    else:
        tokens = torch.empty(len(rows), dtype=torch.long, device=x.device)
        if any(greedy):
            idx = [i for i, g in enumerate(greedy) if g]
            tokens[idx] = x[idx].argmax(dim=-1)
        idx = [i for i, g in enumerate(greedy) if not g]
        tokens[idx] = _sample_random(x[idx], [rows[i] for i in idx])
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, rows, token_list)


def process_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logit_bias, min_tokens masking and penalties, as float32; `logits` is not modified."""
    x = logits.float()  # each step is out of place, so `logits` stays the raw logits
    x = _apply_logit_bias(x, rows)
    x = _apply_min_tokens(x, rows)
    return _apply_penalties(x, rows)


def _apply_logit_bias(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    vocab = x.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        for token, bias in (row.params.logit_bias or {}).items():
            if token >= vocab:
                raise ValueError(
                    f"logit_bias token id {token} is out of range (vocab size {vocab})"
                )
            row_idx.append(i)
            tok_idx.append(token)
            values.append(float(bias))
    if not row_idx:
        return x
    index = (torch.tensor(row_idx, device=x.device), torch.tensor(tok_idx, device=x.device))
    return x.index_put(index, torch.tensor(values, device=x.device), accumulate=True)


def _apply_min_tokens(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # Like vLLM, eos stays masked until min_tokens even with ignore_eos.
    vocab = x.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) >= row.params.min_tokens:
            continue
        blocked = row.eos_token_ids.union(row.params.stop_token_ids)
        for token in blocked:
            if 0 <= token < vocab:
                row_idx.append(i)
                tok_idx.append(token)
    if not row_idx:
        return x
    index = (torch.tensor(row_idx, device=x.device), torch.tensor(tok_idx, device=x.device))
    return x.index_put(index, torch.tensor(float("-inf"), device=x.device))


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """counts[r, t] = occurrences of token t in token_lists[r]; ids outside the vocab ignored."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=device)
    if width:
        padded = torch.full((len(token_lists), width), vocab, dtype=torch.long)
        for r, ids in enumerate(token_lists):
            if ids:
                padded[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        padded = padded.clamp_(0, vocab).to(device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab]


def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    idx = [
        i
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0
        or r.params.presence_penalty != 0.0
        or r.params.frequency_penalty != 0.0
    ]
    if not idx:
        return x
    vocab, device = x.shape[1], x.device
    sub = x[idx]
    output_counts = _token_counts([rows[i].output_token_ids for i in idx], vocab, device)
    in_output = output_counts > 0

    rep = [rows[i].params.repetition_penalty for i in idx]
    if any(p != 1.0 for p in rep):
        seen = in_output | (
            _token_counts([rows[i].prompt_token_ids for i in idx], vocab, device) > 0
        )
        rep_t = torch.tensor(rep, dtype=torch.float32, device=device).unsqueeze(1)
        penalised = torch.where(sub > 0, sub / rep_t, sub * rep_t)
        sub = torch.where(seen, penalised, sub)

    freq = torch.tensor([rows[i].params.frequency_penalty for i in idx], device=device)
    presence = torch.tensor([rows[i].params.presence_penalty for i in idx], device=device)
    sub = sub - freq.unsqueeze(1) * output_counts - presence.unsqueeze(1) * in_output
    return x.index_put((torch.tensor(idx, device=device),), sub)


def _sample_random(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one draw per row of x [R, V]."""
    vocab, device = x.shape[1], x.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)
    x = x / temperature.unsqueeze(1)

    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    need_k = any(k < vocab for k in top_k)
    need_p = any(p < 1.0 for p in top_p)
    if need_k or need_p:
        x = _apply_top_k_top_p(
            x,
            torch.tensor(top_k, device=device) if need_k else None,
            torch.tensor(top_p, device=device) if need_p else None,
        )

    min_p = [r.params.min_p for r in rows]
    probs = x.softmax(dim=-1)
    if any(p > 0 for p in min_p):
        min_p_t = torch.tensor(min_p, device=device).unsqueeze(1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p_t
        x = x.masked_fill(probs < threshold, float("-inf"))
        probs = x.softmax(dim=-1)

    return (probs / _exponentials(rows, vocab, device)).argmax(dim=-1)


def _apply_top_k_top_p(
    x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask to -inf all but each row's top_k tokens, then all outside its top_p nucleus."""
    if top_p is None and top_k is not None:
        kth = x.topk(int(top_k.max()), dim=-1).values.gather(1, (top_k - 1).unsqueeze(1))
        return x.masked_fill(x < kth, float("-inf"))
    vocab = x.shape[1]
    sorted_x, order = x.sort(dim=-1)  # ascending
    if top_k is not None:
        kth = sorted_x.gather(1, (vocab - top_k).unsqueeze(1))
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
    cumulative = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False  # always keep the most likely token
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _exponentials(rows: list[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [R, V]: seeded rows from their own generator, the rest from the global RNG."""
    q = torch.empty(len(rows), vocab, device=device)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        q[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise = torch.empty(vocab, device=row.generator.device)
            q[i] = noise.exponential_(generator=row.generator).to(device)
    # A zero draw would turn p / q into inf (or nan for p = 0) and pick a masked token.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _logprobs(
    raw: torch.Tensor, rows: list[SamplingRow], tokens: list[int]
) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(rows)
    idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not idx:
        return out
    logprobs = torch.log_softmax(raw[idx].float(), dim=-1)
    chosen_ids = torch.tensor([tokens[i] for i in idx], device=raw.device).unsqueeze(1)
    chosen = logprobs.gather(1, chosen_ids).squeeze(1).tolist()
    max_n = min(max(rows[i].params.logprobs for i in idx), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(max_n, dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(idx):
        n = rows[i].params.logprobs
        top = list(zip(top_ids[j][:n], top_values[j][:n], strict=True))
        out[i] = TokenLogprob(token_id=tokens[i], logprob=chosen[j], top=top)
    return out
