"""The real server process on 127.0.0.1, driven by the official openai client and plain HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]


def test_completion_without_model_field_uses_served_model(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 5


def test_chat_completion_answers_paris(client):
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30,
        temperature=0,
    )
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0


def test_streaming_chat_matches_non_streaming(client):
    kwargs = dict(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=20,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert sum(f is not None for f in finishes) == 1 and finishes[-1] is not None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streaming_completion_raw_sse_ends_with_done(server):
    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"prompt": "One, two,", "max_tokens": 6, "temperature": 0, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 2}, "top_p"),
        ({"prompt": ""}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "n": "many"}, "n"),
    ],
)
def test_bad_requests_get_openai_shaped_400(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_malformed_json_is_400_not_422(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "error" in r.json()


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model="SmolLM2-135M-Instruct", prompt="word " * 100, max_tokens=5000
        )
    assert err.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)


def test_server_keeps_serving_after_errors(client):
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", top_p=5)
    ok = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=3)
    assert ok.choices[0].text


def test_tokenize_detokenize_round_trip(server):
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"})
    tokens = r.json()["tokens"]
    assert r.json()["count"] == len(tokens) > 0
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert back == "Hello world"


def test_metrics_exports_kv_bytes(server):
    text = httpx.get(f"{server.url}/metrics").text
    assert 'longserve_kv_cache_bytes{tier="device"}' in text
    assert "longserve_num_requests_running" in text
