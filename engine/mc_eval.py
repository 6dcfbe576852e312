"""Score lettered multiple-choice prompts through the engine and summarise the predictions.

`letter_logits` prefills each prompt once (packed batches through the engine's own model
runner, so a request's bias correction, LoFiT adapter and attention mode apply exactly
as when serving) and returns the next-token logits of the option letters. The
prediction is their argmax.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from engine.detokenizer import IncrementalDetokenizer
from engine.llm_engine import LLMEngine
from engine.mc_data import LETTERS, MCItem, format_prompt, letter_token_ids
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def token_batches(prompts: list[list[int]], batch_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, end) ranges of prompts holding at most `batch_tokens` tokens
    each (a longer prompt gets a range of its own)."""
    start = 0
    while start < len(prompts):
        end, tokens = start, 0
        while end < len(prompts) and (end == start or tokens + len(prompts[end]) <= batch_tokens):
            tokens += len(prompts[end])
            end += 1
        yield start, end
        start = end


def letter_logits(
    engine: LLMEngine,
    prompts: list[list[int]],
    letter_ids: list[int],
    bias_correction: str | None = None,
    lofit: str | None = None,
    attention: str | None = None,
    batch_tokens: int = 4096,
    progress: bool = False,
) -> torch.Tensor:
    """Next-token logits [len(prompts), len(letter_ids)] after each prompt."""
    params = SamplingParams(max_tokens=1, temperature=0)
    mode = attention or engine.config.attention
    for prompt in prompts[:1]:
        engine.validate_request(prompt, params, mode, lofit, bias_correction)
    bias = None if bias_correction is None else engine.bias.resolve(bias_correction)
    bias_slot = 0 if bias is None else engine.bias.slots[bias]
    adapter_slot = 0 if lofit is None else engine.lofit.slot(lofit)
    out: list[torch.Tensor] = []
    with tqdm(total=len(prompts), disable=not progress, desc="score", unit="prompt") as bar:
        for start, end in token_batches(prompts, batch_tokens):
            seqs = [
                Sequence(
                    seq_id=-1 - i,
                    request_id=f"score-{i}",
                    index=0,
                    prompt_token_ids=prompts[i],
                    params=params,
                    detokenizer=IncrementalDetokenizer(engine.tokenizer, prompts[i], params),
                    eos_token_ids=engine.eos_token_ids,
                    attention_mode=mode,
                    lofit=lofit,
                    adapter_slot=adapter_slot,
                    bias_correction=bias,
                    bias_slot=bias_slot,
                    cache=engine.router.new_cache(mode),
                )
                for i in range(start, end)
            ]
            try:
                _, logits = engine.runner.forward_logits([(s, s.num_tokens) for s in seqs])
            finally:
                for s in seqs:
                    engine.router.free(s.cache)
            out.append(logits[:, letter_ids].cpu())
            bar.update(end - start)
    return torch.cat(out)


@dataclass
class MCReport:
    """Prediction summary: accuracy, each letter's share, anchored rate and RStd."""

    n: int
    accuracy: float
    shares: dict[str, float]
    gold_shares: dict[str, float]
    anchored_rate: float  # share of items whose gold is not 'A' that are predicted 'A'
    rstd: float  # standard deviation (population) of the per-letter recalls

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "shares": self.shares,
            "gold_shares": self.gold_shares,
            "anchored_rate": self.anchored_rate,
            "rstd": self.rstd,
        }


def summarise(preds: torch.Tensor, gold: torch.Tensor, num_options: int) -> MCReport:
    """Metrics of predicted letter indices against gold indices."""
    n = len(gold)
    letters = LETTERS[:num_options]
    shares = {c: float((preds == j).sum()) / n for j, c in enumerate(letters)}
    gold_shares = {c: float((gold == j).sum()) / n for j, c in enumerate(letters)}
    not_a = gold != 0
    anchored = float((preds[not_a] == 0).float().mean()) if not_a.any() else 0.0
    recalls = [
        float((preds[gold == j] == j).float().mean())
        for j in range(num_options)
        if (gold == j).any()
    ]
    return MCReport(
        n=n,
        accuracy=float((preds == gold).float().mean()),
        shares=shares,
        gold_shares=gold_shares,
        anchored_rate=anchored,
        rstd=float(torch.tensor(recalls).std(unbiased=False)),
    )


def evaluate(
    engine: LLMEngine,
    items: list[MCItem],
    bias_correction: str | None = None,
    progress: bool = False,
    **kwargs,
) -> MCReport:
    """Predict every item (argmax over the letter tokens) and summarise."""
    num_options = len(items[0].options)
    if any(len(it.options) != num_options for it in items):
        raise ValueError("every item must have the same number of options")
    prompts = [engine.tokenizer.encode(format_prompt(it)) for it in items]
    ids = letter_token_ids(engine.tokenizer, num_options)
    logits = letter_logits(engine, prompts, ids, bias_correction, progress=progress, **kwargs)
    gold = torch.tensor([it.answer for it in items])
    return summarise(logits.argmax(dim=1), gold, num_options)
