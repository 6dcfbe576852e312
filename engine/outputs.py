"""What the engine hands back: per-step deltas for streaming, whole results offline."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import TokenLogprob


@dataclass
class StepOutput:
    """New output of one sequence in one engine step (a streaming delta)."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class CompletionOutput:
    """One finished sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """All samples of one request, as the offline API returns them."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)
