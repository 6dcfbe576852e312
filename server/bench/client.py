"""Streaming requests over the OpenAI-compatible HTTP API, sent on an arrival schedule.

Each request is one SSE stream read with httpx; the arrival time of every chunk that
carries a token is recorded. Output token counts come from the server's final `usage`
chunk (`stream_options.include_usage`); a server that sends none gets the number of
token chunks instead (`RunResult.usage_from_server` says which).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from server.bench.arrivals import send_offsets
from server.bench.datasets import BenchRequest, TextTokenizer
from server.bench.metrics import RequestRecord


class BenchError(RuntimeError):
    """The benchmark cannot run (server unreachable, warm-up failed); one line for the user."""


@dataclass
class RunConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None
    api_key: str | None = None
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    max_duration: float | None = None  # no request is sent after this many seconds
    num_warmups: int = 1
    temperature: float = 0.0
    ignore_eos: bool = False
    request_timeout: float = 600.0
    seed: int = 0
    progress: bool = True

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


@dataclass
class RunResult:
    records: list[RequestRecord]
    t0: float  # when the first request was due
    duration_s: float  # t0 → last response finished
    not_sent: int = 0  # requests skipped because --max-duration passed
    usage_from_server: bool = True
    model: str = ""
    max_in_flight: int = 0
    warmup_errors: list[str] = field(default_factory=list)


def _payload(config: RunConfig, model: str, req: BenchRequest, tok: TextTokenizer | None) -> dict:
    body = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.chat:
        text = req.prompt if isinstance(req.prompt, str) else tok.decode(req.prompt)
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = req.prompt
    return body


def _is_token_chunk(chunk: dict, chat: bool) -> bool:
    choices = chunk.get("choices") or []
    if not choices:
        return False
    delta = choices[0].get("delta", {}) if chat else None
    # The chat role announcement ({"role": "assistant", "content": ""}) carries no token.
    return not (chat and "role" in delta and not delta.get("content"))


async def send_request(
    client: httpx.AsyncClient,
    config: RunConfig,
    model: str,
    req: BenchRequest,
    tok: TextTokenizer | None = None,
) -> tuple[RequestRecord, bool]:
    """Send one streaming request; returns its record and whether usage came from the server."""
    rec = RequestRecord(success=False, prompt_len=req.prompt_len, start=time.perf_counter())
    url = config.base_url.rstrip("/") + config.endpoint
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    usage = None
    try:
        async with client.stream(
            "POST", url, json=_payload(config, model, req, tok), headers=headers
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                rec.error = f"HTTP {response.status_code}: {body[:300]}"
                return rec, False
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                    return rec, False
                if _is_token_chunk(chunk, config.chat):
                    rec.chunk_times.append(now)
                usage = chunk.get("usage") or usage
            if not done:
                rec.error = "stream ended without [DONE]"
            elif not rec.chunk_times:
                rec.error = "no tokens streamed"
            else:
                rec.success = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    finally:
        rec.end = time.perf_counter()
    rec.output_len = usage["completion_tokens"] if usage else len(rec.chunk_times)
    if usage:
        rec.prompt_len = usage["prompt_tokens"]
    return rec, usage is not None


async def served_model(client: httpx.AsyncClient, config: RunConfig) -> str:
    """The first model the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        response = await client.get(config.base_url.rstrip("/") + "/v1/models", headers=headers)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise BenchError(f"cannot list models at {config.base_url}/v1/models: {exc}") from None


async def run_benchmark(
    config: RunConfig, requests: list[BenchRequest], tok: TextTokenizer | None = None
) -> RunResult:
    """Warm up, then send `requests` on the arrival schedule and collect their records."""
    limit = config.max_concurrency or max(len(requests), 1)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(config.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = config.model or await served_model(client, config)
        warm = [requests[i % len(requests)] for i in range(config.num_warmups)] if requests else []
        warm_records = await asyncio.gather(
            *(send_request(client, config, model, r, tok) for r in warm)
        )
        errors = [rec.error for rec, _ in warm_records if not rec.success]
        if warm and len(errors) == len(warm):
            raise BenchError(f"every warm-up request failed; first error: {errors[0]}")

        semaphore = asyncio.Semaphore(limit)
        offsets = send_offsets(len(requests), config.request_rate, config.burstiness, config.seed)
        bar = tqdm(total=len(requests), disable=not config.progress, desc="requests")
        t0 = time.perf_counter()
        deadline = t0 + config.max_duration if config.max_duration else float("inf")
        in_flight = max_in_flight = 0
        usage_flags: list[bool] = []

        async def one(req: BenchRequest) -> RequestRecord | None:
            nonlocal in_flight, max_in_flight
            async with semaphore:
                if time.perf_counter() >= deadline:
                    return None
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                rec, from_server = await send_request(client, config, model, req, tok)
                in_flight -= 1
            if rec.success:
                usage_flags.append(from_server)
            bar.update(1)
            return rec

        tasks = []
        for req, offset in zip(requests, offsets, strict=True):
            due = t0 + offset
            if due >= deadline:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        bar.close()
    records = [r for r in results if r is not None]
    end = max((r.end for r in records), default=time.perf_counter())
    return RunResult(
        records=records,
        t0=t0,
        duration_s=max(end - t0, 1e-9),
        not_sent=len(requests) - len(records),
        usage_from_server=bool(usage_flags) and all(usage_flags),
        model=model,
        max_in_flight=max_in_flight,
        warmup_errors=errors,
    )
