"""Handlers for /v1/completions, /v1/chat/completions, /tokenize and /detokenize."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.request_options import RequestOptions
from engine.sampler import TokenLogprob
from engine.tokenizer import render_chat
from server.errors import APIError, error_body
from server.generation import (
    as_api_error,
    collect_all,
    merge_streams,
    new_request_id,
    stream_prompt,
)
from server.protocol import (
    MAX_SEQUENCES_PER_REQUEST,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

if TYPE_CHECKING:
    from server.app import ServerState


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(t, int) for t in p):
        return [p]  # one prompt given as token ids
    return list(p)


def _sampling(body, max_tokens: int | None, logprobs: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as exc:
        raise as_api_error(exc) from exc


async def _validate(engine: AsyncEngine, prompt, params, options: RequestOptions) -> None:
    """Reject bad input with a status code before a stream's 200 header goes out."""
    try:
        await engine.prepare(
            lambda e: e.validate_request(
                prompt, params, options.attention, options.lofit, options.bias_correction
            )
        )
    except (ValueError, EngineDeadError) as exc:
        raise as_api_error(exc) from exc


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tokenizer: Any, entries: list[TokenLogprob], offset: int) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = _token_text(tokenizer, e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append({_token_text(tokenizer, t): lp for t, lp in e.top})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _chat_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> dict:
    content = []
    for e in entries:
        text = _token_text(tokenizer, e.token_id)
        content.append(
            {
                "token": text,
                "logprob": e.logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": _token_text(tokenizer, t),
                        "logprob": lp,
                        "bytes": list(_token_text(tokenizer, t).encode()),
                    }
                    for t, lp in e.top
                ],
            }
        )
    return {"content": content}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _sse_stream(events: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Serialise chunks as SSE; an error mid-stream becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield _sse(event)
    except APIError as exc:
        yield _sse(error_body(exc.status, exc.message, exc.param, exc.code))
    yield _sse("[DONE]")


async def completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    engine = state.ready_engine()
    options = state.request_options(body)
    state.check_capacity()
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of other than n is not supported", "best_of")
    prompts = _prompts(body)
    if len(prompts) * body.n > MAX_SEQUENCES_PER_REQUEST:
        raise APIError(400, f"prompts x n must be at most {MAX_SEQUENCES_PER_REQUEST}", "prompt")
    params = _sampling(body, body.max_tokens, body.logprobs)
    tokenizer = engine.engine.tokenizer
    request_id = new_request_id("cmpl")
    created = int(time.time())
    n = params.n

    def echo_text(prompt: str | list[int]) -> str:
        if not body.echo:
            return ""
        return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)

    for prompt in prompts:
        await _validate(engine, prompt, params, options)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        streams = [
            stream_prompt(engine, f"{request_id}-{i}", p, params, options, state.metrics)
            for i, p in enumerate(prompts)
        ]

        async def events() -> AsyncIterator[dict]:
            prompt_tokens = [0] * len(prompts)
            completion_tokens = 0
            offsets = [0] * (len(prompts) * n)
            echoed: set[int] = set()
            async for i, delta in merge_streams(streams):
                index = i * n + delta.index
                prompt_tokens[i] = delta.num_prompt_tokens
                completion_tokens += len(delta.token_ids)
                text = delta.text
                if index not in echoed:
                    echoed.add(index)
                    text = echo_text(prompts[i]) + text
                choice: dict[str, Any] = {
                    "index": index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": delta.finish_reason,
                }
                if params.logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(
                        tokenizer, delta.logprobs, offsets[index]
                    )
                offsets[index] += len(text)
                if delta.finished:
                    choice["stop_reason"] = delta.stop_reason
                yield {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": state.model_name,
                    "choices": [choice],
                }
            if include_usage:
                yield {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": state.model_name,
                    "choices": [],
                    "usage": _usage(sum(prompt_tokens), completion_tokens),
                }

        return StreamingResponse(_sse_stream(events()), media_type="text/event-stream")

    results = await collect_all(
        request, engine, request_id, prompts, params, options, state.metrics
    )
    choices, prompt_total, completion_total = [], 0, 0
    for i, result in enumerate(results):
        prompt_total += result.prompt_tokens
        prefix = echo_text(prompts[i])
        for c in result.choices:
            completion_total += len(c.token_ids)
            choices.append(
                {
                    "index": i * n + c.index,
                    "text": prefix + c.text,
                    "logprobs": _completion_logprobs(tokenizer, c.logprobs, len(prefix))
                    if params.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
    return JSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
            "choices": choices,
            "usage": _usage(prompt_total, completion_total),
        }
    )


def _chat_prompt(state: ServerState, chat_messages: list[ChatMessage]) -> list[int]:
    tokenizer = state.ready_engine().engine.tokenizer
    if not chat_messages:
        raise APIError(400, "messages must not be empty", "messages")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in chat_messages]
        text = render_chat(tokenizer, messages)
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


async def chat_completion(
    state: ServerState, body: ChatCompletionRequest, request: Request
) -> Response:
    engine = state.ready_engine()
    options = state.request_options(body)
    state.check_capacity()
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(body, body.effective_max_tokens(), logprobs)
    prompt_ids = _chat_prompt(state, body.messages)
    tokenizer = engine.engine.tokenizer
    request_id = new_request_id("chatcmpl")
    created = int(time.time())

    await _validate(engine, prompt_ids, params, options)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = stream_prompt(engine, request_id, prompt_ids, params, options, state.metrics)

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.model_name,
                "choices": choices,
                **extra,
            }

        async def events() -> AsyncIterator[dict]:
            started: set[int] = set()
            prompt_tokens, completion_tokens = len(prompt_ids), 0
            async for delta in stream:
                prompt_tokens = delta.num_prompt_tokens
                completion_tokens += len(delta.token_ids)
                if delta.index not in started:
                    started.add(delta.index)
                    yield chunk(
                        [
                            {
                                "index": delta.index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                choice: dict[str, Any] = {
                    "index": delta.index,
                    "delta": {"content": delta.text} if delta.text else {},
                    "logprobs": _chat_logprobs(tokenizer, delta.logprobs)
                    if params.logprobs is not None
                    else None,
                    "finish_reason": delta.finish_reason,
                }
                if delta.finished:
                    choice["stop_reason"] = delta.stop_reason
                yield chunk([choice])
            if include_usage:
                yield chunk([], usage=_usage(prompt_tokens, completion_tokens))

        return StreamingResponse(_sse_stream(events()), media_type="text/event-stream")

    [result] = await collect_all(
        request, engine, request_id, [prompt_ids], params, options, state.metrics
    )
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": _chat_logprobs(tokenizer, c.logprobs)
            if params.logprobs is not None
            else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for c in result.choices
    ]
    completion_tokens = sum(len(c.token_ids) for c in result.choices)
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "choices": choices,
            "usage": _usage(result.prompt_tokens, completion_tokens),
        }
    )


async def tokenize(state: ServerState, body: TokenizeRequest) -> dict:
    engine = state.ready_engine().engine
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", "prompt")
    if body.messages is not None:
        tokens = _chat_prompt(state, body.messages)
    else:
        tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}


async def detokenize(state: ServerState, body: DetokenizeRequest) -> dict:
    engine = state.ready_engine().engine
    state.check_model(body.model)
    vocab = engine.model_config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}
