"""The offline API: `LLM(model).generate(prompts, SamplingParams)`."""

from __future__ import annotations

import itertools
from typing import Any

from tqdm import tqdm

from engine.llm_engine import EngineConfig, LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import render_chat


class LLM:
    """Generate completions in-process, batching all prompts through one engine."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine.from_config(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        use_tqdm: bool = False,
        attention: str | None = None,
        lofit: str | None = None,
        bias_correction: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in prompt order.

        A prompt is text or a list of token ids; `lofit` names a loaded LoFiT adapter
        (see `self.engine.load_lofit`) and `bias_correction` a loaded bias profile's
        correction (see `self.engine.load_bias_profile`). Invalid input raises ValueError
        before anything runs.
        """
        params = params or SamplingParams()
        batch = _as_prompt_list(prompts)
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        try:
            for prompt in batch:
                request_id = f"offline-{next(self._ids)}"
                prompt_ids = self.engine.add_request(
                    request_id, prompt, params, attention, lofit, bias_correction
                )
                results[request_id] = RequestOutput(
                    request_id=request_id,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=prompt_ids,
                    outputs=[CompletionOutput(i, "", [], None) for i in range(params.n)],
                )
                order.append(request_id)
        except ValueError:
            for request_id in order:
                self.engine.abort(request_id)
            raise
        total_samples = len(order) * params.n
        with tqdm(total=total_samples, disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    out = results[delta.request_id].outputs[delta.index]
                    out.text += delta.text
                    out.token_ids.extend(delta.token_ids)
                    if params.logprobs is not None:
                        out.logprobs = (out.logprobs or []) + delta.logprobs
                    if delta.finished:
                        out.finish_reason = delta.finish_reason
                        out.stop_reason = delta.stop_reason
                        bar.update(1)
        return [results[r] for r in order]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list) and generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [render_chat(self.tokenizer, conv) for conv in conversations]
        prompt_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(prompt_ids, params, **kwargs)


def _as_prompt_list(prompts: Any) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list")
    return prompts
