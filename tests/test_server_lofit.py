"""LoFiT adapters through the real server: selection by model name or field, mixed batches.

Greedy outputs of concurrent requests are compared with each request run alone; a
divergence at a near-tie (top-2 logprob gap below 1e-4) counts as equal.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from engine.lofit_adapter import LofitAdapter, save_adapter
from tests.support.server_process import ServerProcess

BASE = "SmolLM2-135M-Instruct"


def _random_adapter(seed: int) -> LofitAdapter:
    g = torch.Generator().manual_seed(seed)
    heads = [(layer, head) for layer in (4, 12, 20) for head in (seed % 9, (seed + 4) % 9)]
    return LofitAdapter(
        base_model=BASE,
        heads=heads,
        A=torch.randn(len(heads), 64, generator=g) * 0.5,
        v=torch.randn(len(heads), 64, generator=g) * 2.0,
    )


@pytest.fixture(scope="module")
def lofit_server(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("alpha", 1), ("beta", 2)):
        save_adapter(_random_adapter(seed), root / name)
    with ServerProcess(
        "--lofit",
        f"alpha={root / 'alpha'}",
        "--lofit",
        f"beta={root / 'beta'}",
        "--max-model-len",
        "512",
    ) as proc:
        yield proc


def _complete(client: openai.OpenAI, model: str, **extra):
    return client.completions.create(
        model=model,
        prompt="The weather today is",
        max_tokens=10,
        temperature=0,
        logprobs=2,
        extra_body=extra or None,
    ).choices[0]


def _same_greedy(a, b) -> bool:
    for i, (x, y) in enumerate(zip(a.logprobs.tokens, b.logprobs.tokens, strict=True)):
        if x != y:
            gaps = [sorted(c.logprobs.top_logprobs[i].values(), reverse=True) for c in (a, b)]
            return min(g[0] - g[1] for g in gaps) < 1e-4
    return True


def test_models_lists_adapters_with_their_parent(lofit_server):
    client = openai.OpenAI(base_url=f"{lofit_server.url}/v1", api_key="x", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, f"{BASE}:alpha", f"{BASE}:beta"}
    assert models[f"{BASE}:alpha"].parent == BASE


def test_concurrent_requests_with_different_adapters_each_get_their_own_output(lofit_server):
    client = openai.OpenAI(base_url=f"{lofit_server.url}/v1", api_key="x", max_retries=0)
    alone = {name: _complete(client, f"{BASE}:{name}") for name in ("alpha", "beta")}
    base = _complete(client, BASE)
    with ThreadPoolExecutor(4) as pool:
        futures = {
            "alpha": pool.submit(_complete, client, f"{BASE}:alpha"),
            "beta": pool.submit(_complete, client, BASE, lofit="beta"),
            "none": pool.submit(_complete, client, BASE),
        }
        together = {name: f.result() for name, f in futures.items()}
    assert len({alone["alpha"].text, alone["beta"].text, base.text}) == 3  # adapters matter
    assert _same_greedy(together["alpha"], alone["alpha"])
    assert _same_greedy(together["beta"], alone["beta"])
    assert _same_greedy(together["none"], base)


def test_unknown_adapter_is_an_openai_shaped_404(lofit_server):
    client = openai.OpenAI(base_url=f"{lofit_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        _complete(client, f"{BASE}:gamma")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        _complete(client, BASE, lofit="gamma")
    assert _complete(client, BASE).text  # still serving


def test_runtime_adapter_updates_are_refused_unless_enabled(lofit_server, tmp_path):
    r = httpx.post(f"{lofit_server.url}/v1/adapters", json={"name": "x", "path": str(tmp_path)})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.delete(f"{lofit_server.url}/v1/adapters/alpha").status_code == 403


def test_runtime_load_and_unload_from_the_adapter_dir(tmp_path, default_model_dir):
    root = tmp_path / "adapters"
    save_adapter(_random_adapter(5), root / "gamma")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    save_adapter(_random_adapter(6), tmp_path / "outside")
    with ServerProcess(
        "--allow-adapter-updates", "--adapter-dir", str(root), "--max-model-len", "512"
    ) as proc:
        url = f"{proc.url}/v1/adapters"
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            _complete(client, f"{BASE}:gamma")
        assert httpx.post(url, json={"name": "gamma", "path": "gamma"}).status_code == 200
        assert f"{BASE}:gamma" in {m.id for m in client.models.list().data}
        assert _complete(client, f"{BASE}:gamma").text != _complete(client, BASE).text
        for body, status in (
            ({"name": "gamma", "path": "gamma"}, 400),  # already loaded
            ({"name": "evil", "path": "../outside"}, 400),  # path traversal
            ({"name": "evil", "path": str(tmp_path / "outside")}, 400),  # absolute, outside
            ({"name": "bad", "path": "broken"}, 400),  # malformed files
            ({"name": "none", "path": "missing"}, 400),
            ({"name": "bad/name", "path": "gamma"}, 400),
        ):
            r = httpx.post(url, json=body)
            assert r.status_code == status, (body, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.delete(f"{url}/unknown").status_code == 404
        assert httpx.delete(f"{url}/gamma").status_code == 200
        with pytest.raises(openai.NotFoundError):
            _complete(client, f"{BASE}:gamma")
        assert _complete(client, BASE).text
