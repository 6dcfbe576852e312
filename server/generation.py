"""Run requests on the async engine for the HTTP handlers: collect or stream deltas."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.llm_engine import ContextLengthExceededError
from engine.outputs import StepOutput
from engine.request_options import RequestOptions
from engine.sampler import TokenLogprob
from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.metrics import Metrics, RequestTimer


@dataclass
class Choice:
    """One finished sample as the non-streaming handlers need it."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class PromptResult:
    prompt_tokens: int
    choices: list[Choice]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def as_api_error(exc: Exception) -> APIError:
    """Translate an engine-side exception into the HTTP error a client should see."""
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, ValueError):
        message = str(exc)
        param = message.split(" ", 1)[0] if message else None
        return APIError(400, message, param if param and param.isidentifier() else None)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc))
    return APIError(500, f"internal error: {exc}")


async def stream_prompt(
    engine: AsyncEngine,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    options: RequestOptions,
    metrics: Metrics | None = None,
) -> AsyncIterator[StepOutput]:
    """Deltas of one prompt's samples; engine errors become APIError."""
    timer = RequestTimer(metrics, time.monotonic()) if metrics is not None else None
    completed = False
    try:
        async for delta in engine.generate(request_id, prompt, params, options):
            if timer is not None:
                timer.token(
                    time.monotonic(),
                    len(delta.token_ids),
                    delta.num_prompt_tokens,
                    delta.finish_reason,
                )
            yield delta
        completed = True
    except (ValueError, EngineDeadError) as exc:
        raise as_api_error(exc) from exc
    finally:
        if timer is not None:
            timer.done(time.monotonic(), completed)


async def collect_prompt(
    engine: AsyncEngine,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    options: RequestOptions,
    metrics: Metrics | None = None,
) -> PromptResult:
    """Run one prompt to completion and gather its samples."""
    choices = [Choice(index=i) for i in range(params.n)]
    prompt_tokens = 0
    async for delta in stream_prompt(engine, request_id, prompt, params, options, metrics):
        prompt_tokens = delta.num_prompt_tokens
        choice = choices[delta.index]
        choice.text += delta.text
        choice.token_ids.extend(delta.token_ids)
        choice.logprobs.extend(delta.logprobs)
        if delta.finished:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason
    return PromptResult(prompt_tokens, choices)


async def collect_all(
    request: Request,
    engine: AsyncEngine,
    request_id: str,
    prompts: list[str | list[int]],
    params: SamplingParams,
    options: RequestOptions,
    metrics: Metrics | None = None,
) -> list[PromptResult]:
    """Run every prompt concurrently; abort all of them if the client goes away."""
    tasks = [
        asyncio.create_task(
            collect_prompt(engine, f"{request_id}-{i}", p, params, options, metrics)
        )
        for i, p in enumerate(prompts)
    ]
    try:
        while True:
            done, pending = await asyncio.wait(tasks, timeout=0.5)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            if not pending:
                return [t.result() for t in tasks]
            if await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merge_streams(
    streams: list[AsyncIterator[StepOutput]],
) -> AsyncIterator[tuple[int, StepOutput]]:
    """Interleave several prompts' delta streams as (prompt index, delta)."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StepOutput]) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
