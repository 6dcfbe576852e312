"""LoFiT adapters: format, importer, bank, and per-request application in mixed batches.

The model-level tests drive the tiny model directly with a packed ForwardContext and
compare the logits of every position; the engine-level tests go through `add_request`
with greedy sampling and logprobs, in full and retrieval attention.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.forward_context import ForwardContext, SequenceSlice
from engine.llm_engine import EngineConfig, LLMEngine
from engine.lofit_adapter import LofitAdapter, import_official, load_adapter, save_adapter
from engine.lofit_bank import LofitBank
from engine.sampling_params import SamplingParams

LAYERS, HEADS, HEAD_DIM = 2, 4, 16


def _engine(model_dir, **overrides) -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(model=str(model_dir), **overrides))


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return _engine(tiny_model_dir)


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (length,), generator=gen).tolist()


def _adapter(seed: int, heads: list[tuple[int, int]] | None = None, scale=0.5) -> LofitAdapter:
    gen = torch.Generator().manual_seed(seed)
    if heads is None:
        picks = torch.randperm(LAYERS * HEADS, generator=gen)[:3].tolist()
        heads = sorted((p // HEADS, p % HEADS) for p in picks)
    n = len(heads)
    a = scale * torch.randn(n, HEAD_DIM, generator=gen)
    v = scale * torch.randn(n, HEAD_DIM, generator=gen)
    return LofitAdapter("tiny", list(heads), a, v)


def _logits(engine: LLMEngine, prompts: list[list[int]], slots: list[int]) -> list[torch.Tensor]:
    """Logits at every position of each prompt, all prefilled in one packed step."""
    caches = [engine.router.new_cache("full") for _ in prompts]
    slices, ids, pos, token_slots = [], [], [], []
    for cache, prompt, slot in zip(caches, prompts, slots, strict=True):
        slices.append(SequenceSlice(cache, len(ids), len(prompt), 0))
        ids += prompt
        pos += range(len(prompt))
        token_slots += [slot] * len(prompt)
    ctx = ForwardContext(slices=slices, backend=engine.router)
    ctx.adapter_slots = torch.tensor(token_slots)
    hook = engine.lofit.hook(ctx)
    if hook is not None:
        ctx.head_output_hooks.append(hook)
    with torch.inference_mode():
        hidden = engine.runner.model(torch.tensor(ids), torch.tensor(pos), ctx)
        logits = engine.runner.model.compute_logits(hidden).float()
    for cache in caches:
        engine.router.free(cache)
    return [logits[s.start : s.end] for s in slices]


def _generate(engine: LLMEngine, requests: list[tuple[list[int], str | None]], **kw):
    """Greedy-generate every (prompt, adapter) in one batch; (tokens, logprobs) per row."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=4)
    results: dict[str, tuple[list[int], list]] = {}
    for i, (prompt, lofit) in enumerate(requests):
        rid = f"r{i}-{id(results)}"
        engine.add_request(rid, prompt, params, lofit=lofit, **kw)
        results[rid] = ([], [])
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id][0].extend(out.token_ids)
            results[out.request_id][1].extend(out.logprobs)
    return list(results.values())


def _assert_same(a, b, tol: float = 1e-4) -> None:
    assert a[0] == b[0]
    for la, lb in zip(a[1], b[1], strict=True):
        assert [t for t, _ in la.top] == [t for t, _ in lb.top]
        for (_, x), (_, y) in zip(la.top, lb.top, strict=True):
            assert abs(x - y) < tol


# -- the bank and the model ---------------------------------------------------------------


def test_zero_adapter_is_exact_identity(engine):
    zero = LofitAdapter(
        "tiny",
        [(layer, head) for layer in range(LAYERS) for head in range(HEADS)],
        torch.zeros(LAYERS * HEADS, HEAD_DIM),
        torch.zeros(LAYERS * HEADS, HEAD_DIM),
    )
    slot = engine.lofit.register("zero", zero)
    try:
        prompts = [_prompt(9, 1), _prompt(5, 2)]
        base = _logits(engine, prompts, [0, 0])
        with_zero = _logits(engine, prompts, [slot, slot])
        for x, y in zip(base, with_zero, strict=True):
            assert torch.equal(x, y)
    finally:
        engine.unload_lofit("zero")


def test_no_hook_when_no_row_has_an_adapter(engine):
    bank = LofitBank(engine.model_config)
    bank.register("a", _adapter(3))
    ctx = ForwardContext(slices=[], backend=engine.router)
    assert bank.hook(ctx) is None
    ctx.adapter_slots = torch.zeros(5, dtype=torch.long)
    assert bank.hook(ctx) is None
    ctx.adapter_slots = torch.tensor([0, 1, 0, 0, 0])
    h = torch.randn(5, HEADS, HEAD_DIM)
    out = bank.hook(ctx)(0 if 0 in bank.A else 1, h)
    assert torch.equal(out[[0, 2, 3, 4]], h[[0, 2, 3, 4]])
    assert not torch.equal(out[1], h[1])


def test_bank_stacks_only_layers_with_heads_and_reuses_slots(engine):
    bank = LofitBank(engine.model_config)
    a = _adapter(4, heads=[(1, 2)])
    assert bank.register("a", a) == 1
    assert set(bank.A) == {1} and bank.A[1].shape == (2, HEADS, HEAD_DIM)
    assert torch.equal(bank.A[1][1, 2], a.A[0]) and torch.equal(bank.v[1][1, 2], a.v[0])
    assert not bank.A[1][1, [0, 1, 3]].any() and not bank.A[1][0].any()
    assert bank.register("b", _adapter(5, heads=[(0, 0)])) == 2
    bank.unregister("a")
    assert bank.register("c", _adapter(6, heads=[(0, 3)])) == 1
    assert set(bank.A) == {0}
    with pytest.raises(ValueError, match="already loaded"):
        bank.register("c", _adapter(6))


def test_nonzero_adapter_changes_logits(engine):
    slot = engine.lofit.register("changes", _adapter(7))
    try:
        prompt = _prompt(8, 3)
        (base,) = _logits(engine, [prompt], [0])
        (adapted,) = _logits(engine, [prompt], [slot])
        assert (base - adapted).abs().max() > 1e-2
    finally:
        engine.unload_lofit("changes")


def test_mixed_batch_rows_match_each_row_alone(engine):
    names = [f"mix{i}" for i in range(4)]
    slots = [engine.lofit.register(n, _adapter(10 + i)) for i, n in enumerate(names)]
    try:
        prompts = [_prompt(4 + 3 * i, 20 + i) for i in range(5)]
        row_slots = [*slots, 0]
        batched = _logits(engine, prompts, row_slots)
        for prompt, slot, logits in zip(prompts, row_slots, batched, strict=True):
            (alone,) = _logits(engine, [prompt], [slot])
            torch.testing.assert_close(logits, alone, atol=1e-4, rtol=0)
        # the adapters differ from each other, so the check above is not vacuous
        same_prompt = _logits(engine, [prompts[0]] * 5, row_slots)
        assert all((same_prompt[0] - x).abs().max() > 1e-2 for x in same_prompt[1:])
    finally:
        for n in names:
            engine.unload_lofit(n)


# -- through the engine -----------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "retrieval"])
def test_engine_mixed_batch_matches_alone(tiny_model_dir, tmp_path, attention):
    engine = _engine(tiny_model_dir, attention=attention, sink_tokens=2, window_tokens=4, top_k=4)
    for i in range(4):
        save_adapter(_adapter(30 + i), tmp_path / f"a{i}")
        engine.load_lofit(f"a{i}", str(tmp_path / f"a{i}"))
    requests = [(_prompt(10 + i, 40 + i), f"a{i}") for i in range(4)] + [(_prompt(12, 50), None)]
    batched = _generate(engine, requests)
    for request, row in zip(requests, batched, strict=True):
        _assert_same(row, _generate(engine, [request])[0])
    # every adapter moved its row away from the unadapted run of the same prompt
    for prompt, lofit in requests[:4]:
        with_adapter = _generate(engine, [(prompt, lofit)])[0]
        without = _generate(engine, [(prompt, None)])[0]
        diffs = [
            abs(x.top[0][1] - y.top[0][1]) for x, y in zip(with_adapter[1], without[1], strict=True)
        ]
        assert with_adapter[0] != without[0] or max(diffs) > 1e-3
    assert engine.lofit_adapters() == ["a0", "a1", "a2", "a3"]


def test_unload_refused_while_in_use_and_unknown_names(engine, tmp_path):
    save_adapter(_adapter(60), tmp_path / "busy")
    engine.load_lofit("busy", str(tmp_path / "busy"))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine.add_request("busy-1", _prompt(6, 61), params, lofit="busy")
    seq = engine._requests["busy-1"][0]
    assert seq.adapter_slot == engine.lofit.slot("busy")
    assert seq.cache_key == ("busy", "full", None)
    engine.step()
    with pytest.raises(ValueError, match="in use"):
        engine.unload_lofit("busy")
    while engine.has_unfinished():
        engine.step()
    engine.unload_lofit("busy")
    with pytest.raises(ValueError, match="lofit"):
        engine.add_request("busy-2", _prompt(6, 62), params, lofit="busy")
    with pytest.raises(ValueError, match="lofit"):
        engine.unload_lofit("busy")
    assert not engine.has_unfinished()


def test_offline_generate_passes_lofit(tiny_model_dir, tmp_path):
    from engine.llm import LLM

    llm = LLM(str(tiny_model_dir))
    save_adapter(_adapter(70, scale=2.0), tmp_path / "ad")
    llm.engine.load_lofit("ad", str(tmp_path / "ad"))
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)
    prompt = _prompt(8, 71)
    (plain,) = llm.generate([prompt], params)
    (adapted,) = llm.generate([prompt], params, lofit="ad")
    expected = _generate(llm.engine, [(prompt, "ad")])[0]
    assert adapted.outputs[0].token_ids == expected[0][:5]  # _generate makes 6 tokens
    first = (plain.outputs[0].logprobs[0].logprob, adapted.outputs[0].logprobs[0].logprob)
    assert plain.outputs[0].token_ids != adapted.outputs[0].token_ids or first[0] != first[1]
    with pytest.raises(ValueError, match="lofit"):
        llm.generate([prompt], params, lofit="missing")


# -- the format and the importer --------------------------------------------------------------


def test_save_load_round_trip(engine, tmp_path):
    adapter = _adapter(80)
    save_adapter(adapter, tmp_path / "rt")
    config = json.loads((tmp_path / "rt" / "adapter_config.json").read_text())
    assert config == {
        "format": "lofit",
        "base_model": "tiny",
        "heads": [list(h) for h in adapter.heads],
        "head_dim": HEAD_DIM,
    }
    loaded = load_adapter(tmp_path / "rt", engine.model_config, base_model="tiny")
    assert loaded.heads == adapter.heads and loaded.base_model == "tiny"
    assert torch.equal(loaded.A, adapter.A) and torch.equal(loaded.v, adapter.v)
    with pytest.raises(ValueError, match="base model"):
        load_adapter(tmp_path / "rt", base_model="other-model")


def test_import_official_matches_own_format(engine, tmp_path):
    adapter = _adapter(90, heads=[(0, 1), (1, 0), (1, 3)])
    selected = dict(zip(adapter.heads, range(3), strict=True))
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for layer in range(LAYERS):
        for head in range(HEADS):
            i = selected.get((layer, head))
            a = adapter.A[i] if i is not None else torch.zeros(HEAD_DIM)
            v = adapter.v[i] if i is not None else torch.zeros(HEAD_DIM)
            prefix = f"model.layers.{layer}.self_attn."
            shards[layer][f"{prefix}attn_A.{head}"] = a.clone()
            shards[layer][f"{prefix}attn_v.{head}"] = v.clone()
    shards[0]["model.embed_tokens.weight"] = torch.randn(4, 8)  # other weights are skipped
    ckpt = tmp_path / "official"
    ckpt.mkdir()
    for i, shard in enumerate(shards):
        save_file(shard, str(ckpt / f"model-0000{i + 1}-of-00002.safetensors"))

    imported = import_official(ckpt, "tiny", HEAD_DIM)
    assert imported.heads == adapter.heads
    assert torch.equal(imported.A, adapter.A) and torch.equal(imported.v, adapter.v)

    own = engine.lofit.register("own", adapter)
    official = engine.lofit.register("official", imported)
    try:
        prompt = _prompt(7, 91)
        x, y = _logits(engine, [prompt, prompt], [own, official])
        assert torch.equal(x, y)
    finally:
        engine.unload_lofit("own")
        engine.unload_lofit("official")


def test_import_official_rejects_bad_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        import_official(tmp_path / "nope", "tiny", HEAD_DIM)
    save_file({"model.embed_tokens.weight": torch.ones(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no LoFiT tensors"):
        import_official(tmp_path / "plain.safetensors", "tiny", HEAD_DIM)
    key = "model.layers.0.self_attn.attn_A.0"
    save_file({key: torch.ones(HEAD_DIM + 1)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="expected"):
        import_official(tmp_path / "shape.safetensors", "tiny", HEAD_DIM)
    save_file({key: torch.zeros(HEAD_DIM)}, str(tmp_path / "zeros.safetensors"))
    with pytest.raises(ValueError, match="all zeros"):
        import_official(tmp_path / "zeros.safetensors", "tiny", HEAD_DIM)


def _write(path, config, tensors) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (path / "adapter_config.json").write_text(text)
    if tensors is not None:
        save_file(tensors, str(path / "adapter.safetensors"))


def _good_config(**changes):
    config = {"format": "lofit", "base_model": "tiny", "heads": [[0, 1]], "head_dim": HEAD_DIM}
    return {**config, **changes}


GOOD = {"A": torch.ones(1, HEAD_DIM), "v": torch.ones(1, HEAD_DIM)}


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        (None, GOOD, "no adapter_config.json"),
        (_good_config(), None, "no adapter.safetensors"),
        ("{not json", GOOD, "cannot parse"),
        (_good_config(format="lora"), GOOD, "format"),
        ({"format": "lofit", "heads": [[0, 1]]}, GOOD, "missing base_model, head_dim"),
        (_good_config(head_dim=0), GOOD, "head_dim"),
        (_good_config(heads=[[0]]), GOOD, "pairs"),
        (
            _good_config(heads=[[0, 1], [0, 1]]),
            {k: t.repeat(2, 1) for k, t in GOOD.items()},
            "twice",
        ),
        (_good_config(), {"A": GOOD["A"]}, "no tensor 'v'"),
        (
            _good_config(),
            {"A": torch.ones(2, HEAD_DIM), "v": torch.ones(2, HEAD_DIM)},
            r"\[1, head_dim\]",
        ),
        (_good_config(), {"A": torch.ones(1, 8), "v": torch.ones(1, 8)}, "shape"),
        (_good_config(heads=[[2, 0]]), GOOD, "out of range"),
        (_good_config(heads=[[0, 4]]), GOOD, "out of range"),
        (_good_config(head_dim=8), {"A": torch.ones(1, 8), "v": torch.ones(1, 8)}, "head_dim is 8"),
        (_good_config(), {"A": torch.full((1, HEAD_DIM), float("nan")), "v": GOOD["v"]}, "NaN"),
    ],
)
def test_load_adapter_rejects_malformed(engine, tmp_path, config, tensors, match):
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(ValueError, match=match):
        load_adapter(tmp_path / "bad", engine.model_config)
    with pytest.raises(ValueError, match=match):
        engine.load_lofit("bad", str(tmp_path / "bad"))
    assert "bad" not in engine.lofit


def test_load_adapter_reads_no_pickles(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_adapter(tmp_path / "missing")
    _write(tmp_path / "pickled", _good_config(), None)
    torch.save(GOOD, tmp_path / "pickled" / "adapter.bin")
    with pytest.raises(ValueError, match="no adapter.safetensors"):
        load_adapter(tmp_path / "pickled")
    (tmp_path / "pickled" / "adapter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        load_adapter(tmp_path / "pickled")
