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


def test_metrics_export_vllm_style_series(server, client):
    client.completions.create(model=MODEL, prompt="Count:", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for series in (
        'longserve:kv_cache_bytes{tier="device"}',
        'longserve:kv_cache_tokens{tier="host"}',
        "longserve:num_requests_running",
        "longserve:num_requests_waiting",
        "longserve:num_preemptions_total",
        "longserve:index_keys_scanned_per_search",
    ):
        assert series in text, series
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['longserve:request_success_total{finished_reason="length"}'] >= 1
    assert values["longserve:generation_tokens_total"] >= 3
    assert values["longserve:prompt_tokens_total"] >= 1
    for hist in (
        "time_to_first_token",
        "inter_token_latency",
        "e2e_request_latency",
        "request_queue_time",
    ):
        assert values[f"longserve:{hist}_seconds_count"] >= 1, hist


MODEL = "SmolLM2-135M-Instruct"


def test_streamed_and_whole_completion_agree_and_usage_is_exact(server, client):
    kwargs = dict(
        model=MODEL,
        prompt="The three primary colours are",
        max_tokens=12,
        temperature=0,
        logprobs=1,
    )
    whole = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    count = httpx.post(f"{server.url}/tokenize", json={"prompt": kwargs["prompt"]}).json()
    assert whole.usage.prompt_tokens == count["count"]
    assert whole.usage.completion_tokens == len(whole.choices[0].logprobs.tokens)
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_samples_have_indices_and_max_tokens_gives_length(client):
    resp = client.completions.create(model=MODEL, prompt="Hello", n=3, max_tokens=5, seed=3)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 15
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=5, seed=3
    )
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_stop_string_spanning_tokens_never_appears(client):
    base = dict(
        model=MODEL,
        prompt="Once upon a time, in a small village by the sea,",
        max_tokens=30,
        temperature=0,
        logprobs=0,
    )
    free = client.completions.create(**base).choices[0]
    tokens = free.logprobs.tokens
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(1, len(tokens) - 1) if tokens[i] and len(tokens[i + 1]) >= 2)
    stop = tokens[i][-1:] + tokens[i + 1][:2]
    expected = free.text[: free.text.index(stop)]
    stopped = client.completions.create(**{**base, "stop": [stop]}).choices[0]
    assert stopped.text == expected and stopped.finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**{**base, "stop": [stop]}, stream=True)
    )
    assert streamed == expected and stop not in streamed


@pytest.mark.parametrize("prompt", ["Emoji list: 😀 😃 😄 😁 😆", "北京是中国的首都。上海是"])
def test_streamed_non_ascii_text_has_no_replacement_characters(client, prompt):
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(**kwargs, stream=True)]
    text = "".join(pieces)
    assert sum(ord(ch) > 127 for ch in text) >= 3, text  # the model does write non-ASCII
    assert all("\ufffd" not in p for p in pieces)
    assert text == client.completions.create(**kwargs).choices[0].text


def test_chat_logprobs_shapes(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say yes."}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= 0
