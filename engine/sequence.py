"""One generated sequence: its tokens, progress through the cache and output so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampler import SamplingRow, TokenLogprob
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A prompt plus what has been generated for it; sample `index` of request `request_id`."""

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    attention_mode: str
    lofit: str | None = None  # the LoFiT adapter's name
    adapter_slot: int = 0  # its slot in the LoFiT bank; 0 = none
    bias_correction: str | None = None  # canonical "<mode>:<profile>" (see BiasBank)
    bias_slot: int = 0  # its slot in the bias bank; 0 = none
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cache: object | None = None
    num_computed: int = 0  # tokens whose K/V are in the cache
    prefix_entry: object | None = None  # the prefix-cache entry its cache extends
    snapshot_at: int | None = None  # prefill stops here once to snapshot for the prefix cache
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    pending_text: str = ""  # released by the detokenizer, not yet handed to the caller

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def cache_key(self) -> tuple[str | None, str, str | None]:
        """What this sequence's KV depends on besides its tokens: an adapter or an anchored
        bias correction changes every position's hidden state, so caches are only
        shareable under equal keys (a prior correction only touches the logits)."""
        anchored = self.bias_correction if self.bias_kv else None
        return (self.lofit, self.attention_mode, anchored)

    @property
    def bias_kv(self) -> bool:
        """Whether the bias correction acts on activations (and so on the KV)."""
        return bool(self.bias_correction) and self.bias_correction.startswith("anchored")

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed > 1

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the concatenation."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(
            params=self.params,
            prompt_token_ids=self.prompt_token_ids,
            output_token_ids=self.output_token_ids,
            generator=self.generator,
            eos_token_ids=self.eos_token_ids,
        )
