"""Concurrency on the real server: many streaming clients, disconnects free everything."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from tests.support.server_process import ServerProcess


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def _stream_all(client: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
    stream = await client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=f"Story number {i}:",
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    text, finish = "", None
    async for chunk in stream:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_32_concurrent_streaming_clients_all_finish(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(_stream_all(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    assert all(finish == "length" and text for text, finish in results)


def test_disconnecting_clients_leave_nothing_running(server):
    idle = httpx.get(f"{server.url}/metrics").text
    idle_device = _metric(idle, 'longserve:kv_cache_bytes{tier="device"}')

    async def disconnect_after_two_chunks(client: httpx.AsyncClient, i: int) -> int:
        body = {
            "prompt": f"Tell me about {i}",
            "max_tokens": 500,
            "stream": True,
            "ignore_eos": True,
        }
        seen = 0
        async with client.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == 2:
                        break  # leaving the context closes the connection
        return seen

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(disconnect_after_two_chunks(client, i) for i in range(20))
            )

    assert asyncio.run(run()) == [2] * 20
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        running = _metric(text, "longserve:num_requests_running")
        waiting = _metric(text, "longserve:num_requests_waiting")
        device = _metric(text, 'longserve:kv_cache_bytes{tier="device"}')
        if running == waiting == 0 and device == idle_device:
            break
        time.sleep(0.2)
    assert (running, waiting, device) == (0, 0, idle_device)
    assert _metric(text, "longserve:request_aborted_total") >= 20


def test_health_503_while_loading_then_429_when_queue_full(default_model_dir):
    with ServerProcess(
        "--max-num-seqs", "1", "--max-waiting-requests", "1", wait_ready=False
    ) as proc:
        statuses = proc.poll_health_until_ready()
        assert statuses[0] == 503 and statuses[-1] == 200
        long_body = {"prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", f"{proc.url}/v1/completions", json=long_body) as first:
                first_lines = first.iter_lines()  # kept referenced: dropping it closes
                next(first_lines)  # the first request is running

                async def second_waits():
                    async with httpx.AsyncClient(timeout=120) as ac:
                        async with ac.stream(
                            "POST", f"{proc.url}/v1/completions", json=long_body
                        ) as r2:
                            await _wait_for_waiting(proc.url, 1)
                            third = await ac.post(
                                f"{proc.url}/v1/completions",
                                json={"prompt": "hi", "max_tokens": 2},
                            )
                            assert r2.status_code == 200
                            return third

                third = asyncio.run(second_waits())
                assert next(x for x in first_lines if x).startswith("data: ")  # still streaming
        assert third.status_code == 429
        assert third.json()["error"]["type"] == "rate_limit_error"
        asyncio.run(_wait_for_waiting(proc.url, 0, at_most=True))  # the aborts land
        ok = httpx.post(
            f"{proc.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
        )
        assert ok.status_code == 200


async def _wait_for_waiting(url: str, count: int, at_most: bool = False) -> None:
    """Poll /metrics until the waiting queue holds >= count (or <= count) sequences."""
    async with httpx.AsyncClient() as ac:
        for _ in range(600):
            text = (await ac.get(f"{url}/metrics")).text
            waiting = _metric(text, "longserve:num_requests_waiting")
            if (waiting <= count) if at_most else (waiting >= count):
                return
            await asyncio.sleep(0.05)
    pytest.fail(f"the waiting queue never reached {count}")


def test_non_streaming_client_that_gives_up_aborts_its_request(server):
    before = _metric(httpx.get(f"{server.url}/metrics").text, "longserve:request_aborted_total")
    body = {"prompt": "Tell me everything", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if _metric(text, "longserve:num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert _metric(text, "longserve:num_requests_running") == 0
    assert _metric(text, "longserve:request_aborted_total") >= before + 1
