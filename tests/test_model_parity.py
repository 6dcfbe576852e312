"""Our Llama-family and GPT-2 modules against transformers' own, on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

from engine.attention_backend import CacheShape
from engine.forward_context import ForwardContext, SequenceSlice
from engine.full_attention import FullAttentionBackend
from engine.model_config import SUPPORTED_ACTIVATIONS, ModelConfig, RopeConfig
from engine.models import ACTIVATIONS, CausalLM, build_model

TOL = 1e-4
PROMPT_LENS = (1, 7, 40, 100)
DECODE_STEPS = 20
VOCAB = 96

transformers.logging.set_verbosity_error()

LLAMA_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
    # Larger than the default 0.02 so attention is far from uniform and RoPE matters.
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
)
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}

CASES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_bias_head_dim": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"attention_bias": True, "mlp_bias": True, "head_dim": 24, "num_key_value_heads": 4},
    ),
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    **{
        f"llama_rope_{name}": (
            "LlamaConfig",
            "LlamaForCausalLM",
            {"rope_parameters": {"rope_theta": 10000.0, **params}},
        )
        for name, params in SCALINGS.items()
    },
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            initializer_range=0.25,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and a busy machine makes them stall."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_pair(case: str) -> tuple[torch.nn.Module, CausalLM]:
    """A seeded random transformers model and ours with the same weights."""
    config_cls, model_cls, overrides = CASES[case]
    kwargs = overrides if config_cls == "GPT2Config" else {**LLAMA_BASE, **overrides}
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_cls)(**kwargs)
    hf = getattr(transformers, model_cls)(hf_config).eval()
    if case == "llama_bias_head_dim":
        with torch.no_grad():  # biases start at zero; make them count
            for name, p in hf.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    config = ModelConfig.from_hf_dict(hf_config.to_dict())
    ours = build_model(config).eval()
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


class Runner:
    """Drives one of our models through the full backend, one sequence at a time."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.backend = FullAttentionBackend(model.cache_shape())

    def step(self, caches: list, chunks: list[list[int]]) -> torch.Tensor:
        """One packed forward: chunk i is appended to caches[i]; returns all logits."""
        slices, ids, positions, seq_lens, start = [], [], [], [], 0
        for cache, chunk in zip(caches, chunks, strict=True):
            cached = self.backend.cache_len(cache)
            slices.append(SequenceSlice(cache, start=start, num_new=len(chunk), num_cached=cached))
            ids += chunk
            positions += range(cached, cached + len(chunk))
            seq_lens += [cached + len(chunk)] * len(chunk)
            start += len(chunk)
        ctx = ForwardContext(
            slices=slices,
            backend=self.backend,
            seq_len_per_token=torch.tensor(seq_lens),
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), ctx)
        return self.model.compute_logits(hidden)

    def greedy(self, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cache = self.backend.new_cache()
        prefill = self.step([cache], [prompt])
        token, decode_logits = int(prefill[-1].argmax()), []
        for _ in range(steps):
            logits = self.step([cache], [[token]])[0]
            decode_logits.append(logits)
            token = int(logits.argmax())
        self.backend.free(cache)
        return prefill, decode_logits


def hf_greedy(hf, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' reference: one prefill, then token-by-token decode with its cache."""
    rotary = getattr(getattr(hf, "model", None), "rotary_emb", None)
    if rotary is not None and rotary.rope_type == "dynamic":
        # Its dynamic-NTK state outlives a sequence; start each prompt fresh.
        rotary.inv_freq = rotary.original_inv_freq.clone()
        rotary.max_seq_len_cached = rotary.original_max_seq_len
    cache = DynamicCache(config=hf.config)
    out = hf(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    prefill = out.logits[0]
    token, decode_logits = int(prefill[-1].argmax()), []
    for _ in range(steps):
        out = hf(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1]
        decode_logits.append(logits)
        token = int(logits.argmax())
    return prefill, decode_logits


def prompt_of(length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_prefill_and_greedy_decode_match_transformers(case: str) -> None:
    hf, ours = make_pair(case)
    runner = Runner(ours)
    for length in PROMPT_LENS:
        prompt = prompt_of(length)
        ref_prefill, ref_decode = hf_greedy(hf, prompt, DECODE_STEPS)
        our_prefill, our_decode = runner.greedy(prompt, DECODE_STEPS)
        assert our_prefill.shape == (length, VOCAB)
        torch.testing.assert_close(our_prefill, ref_prefill, atol=TOL, rtol=0)
        ref_tokens = [int(x.argmax()) for x in ref_decode]
        our_tokens = [int(x.argmax()) for x in our_decode]
        assert our_tokens == ref_tokens, f"{case}, prompt length {length}"
        torch.testing.assert_close(
            torch.stack(our_decode), torch.stack(ref_decode), atol=TOL, rtol=0
        )


@torch.inference_mode()
def test_rope_scaling_changes_logits() -> None:
    """The parity cases are sensitive: each scaling type moves logits well past TOL."""
    _, base = make_pair("llama_gqa")
    prompt = prompt_of(100)
    base_runner = Runner(base)
    base_logits = base_runner.step([base_runner.backend.new_cache()], [prompt])
    for name in SCALINGS:
        _, scaled = make_pair(f"llama_rope_{name}")
        runner = Runner(scaled)
        logits = runner.step([runner.backend.new_cache()], [prompt])
        assert (logits - base_logits).abs().max() > 100 * TOL, name


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2", "gpt2"])
@torch.inference_mode()
def test_ragged_batch_equals_sequences_alone(case: str) -> None:
    _, ours = make_pair(case)
    runner = Runner(ours)
    prompts = [prompt_of(n, seed=1) for n in (5, 17, 33)]
    alone = [runner.step([runner.backend.new_cache()], [p]) for p in prompts]
    caches = [runner.backend.new_cache() for _ in prompts]
    packed = runner.step(caches, prompts)
    torch.testing.assert_close(packed, torch.cat(alone), atol=TOL, rtol=0)

    # One batched decode step (one token per sequence) against the same step alone.
    next_tokens = [[int(x[-1].argmax())] for x in alone]
    batched = runner.step(caches, next_tokens)
    for i, (prompt, token) in enumerate(zip(prompts, next_tokens, strict=True)):
        cache = runner.backend.new_cache()
        runner.step([cache], [prompt])
        single = runner.step([cache], [token])
        torch.testing.assert_close(batched[i : i + 1], single, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
@torch.inference_mode()
def test_chunked_prefill_equals_one_shot(case: str) -> None:
    _, ours = make_pair(case)
    runner = Runner(ours)
    prompt = prompt_of(50, seed=2)
    one_shot = runner.step([runner.backend.new_cache()], [prompt])
    cache = runner.backend.new_cache()
    chunks = [runner.step([cache], [prompt[a:b]]) for a, b in ((0, 20), (20, 41), (41, 50))]
    torch.testing.assert_close(torch.cat(chunks), one_shot, atol=TOL, rtol=0)
    assert runner.backend.cache_len(cache) == 50


@torch.inference_mode()
def test_dynamic_rope_defaults_to_position_plus_one_for_decode() -> None:
    """Without seq_len_per_token a decode token's length is its position + 1."""
    hf, ours = make_pair("llama_rope_dynamic")
    prompt = prompt_of(80)
    _, ref_decode = hf_greedy(hf, prompt, 1)
    runner = Runner(ours)
    cache = runner.backend.new_cache()
    token = int(runner.step([cache], [prompt])[-1].argmax())
    ctx = ForwardContext(
        slices=[SequenceSlice(cache, start=0, num_new=1, num_cached=80)], backend=runner.backend
    )
    hidden = ours(torch.tensor([token]), torch.tensor([80]), ctx)
    torch.testing.assert_close(ours.compute_logits(hidden)[0], ref_decode[0], atol=TOL, rtol=0)


@torch.inference_mode()
def test_head_and_mlp_hooks_see_each_layer() -> None:
    _, ours = make_pair("llama_gqa")
    runner = Runner(ours)
    prompt = prompt_of(7)
    plain = runner.step([runner.backend.new_cache()], [prompt])
    seen: list[tuple[str, int, tuple[int, ...]]] = []

    def head_hook(layer: int, h: torch.Tensor) -> torch.Tensor:
        seen.append(("head", layer, tuple(h.shape)))
        return h * 1.5 if layer == 1 else h

    def mlp_hook(layer: int, act: torch.Tensor) -> torch.Tensor:
        seen.append(("mlp", layer, tuple(act.shape)))
        return act

    ctx = ForwardContext(
        slices=[SequenceSlice(runner.backend.new_cache(), 0, len(prompt), 0)],
        backend=runner.backend,
        head_output_hooks=[head_hook],
        mlp_act_hooks=[mlp_hook],
    )
    hooked = ours.compute_logits(ours(torch.tensor(prompt), torch.arange(len(prompt)), ctx))
    assert seen == [
        ("head", 0, (7, 4, 16)),
        ("mlp", 0, (7, 96)),
        ("head", 1, (7, 4, 16)),
        ("mlp", 1, (7, 96)),
    ]
    assert (hooked - plain).abs().max() > 100 * TOL


@torch.inference_mode()
def test_bfloat16_model_tracks_float32() -> None:
    hf, ours32 = make_pair("llama_gqa")
    ours = build_model(ours32.config, dtype=torch.bfloat16)
    ours.load_hf_state_dict(hf.state_dict())
    assert ours.cache_shape().dtype == torch.bfloat16
    prompt = prompt_of(40)
    ref, _ = hf_greedy(hf, prompt, 0)
    logits, decode = Runner(ours).greedy(prompt, 3)
    assert logits.dtype == torch.bfloat16 and len(decode) == 3
    # bfloat16 keeps ~3 significant digits; logits here span about +-8.
    assert (logits.float() - ref).abs().max() < 1.0
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_config_parses_old_and_new_rope_styles() -> None:
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
    }
    old = ModelConfig.from_hf_dict(
        {**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    new = ModelConfig.from_hf_dict(
        {**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    )
    assert old.rope == new.rope == RopeConfig("linear", 5e5, factor=2.0)
    assert old.num_kv_heads == 2 and old.head_dim == 4 and old.rope.theta == 5e5
    yarn = ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    assert yarn.rope.original_max_position_embeddings == 64
    eos = ModelConfig.from_hf_dict({**base, "eos_token_id": [2, 7]})
    assert eos.eos_token_ids == (2, 7) and eos.eos_token_id == 2
    qwen = ModelConfig.from_hf_dict({**base, "model_type": "qwen2"})
    assert (qwen.qkv_bias, qwen.o_bias) == (True, False)
    assert set(SUPPORTED_ACTIVATIONS) == set(ACTIVATIONS)


@pytest.mark.parametrize("case", ["llama_rope_llama3", "mistral", "qwen2", "gpt2"])
def test_config_from_saved_dir(case: str, tmp_path) -> None:
    config_cls, _, overrides = CASES[case]
    kwargs = overrides if config_cls == "GPT2Config" else {**LLAMA_BASE, **overrides}
    getattr(transformers, config_cls)(**kwargs).save_pretrained(tmp_path)
    config = ModelConfig.from_dir(tmp_path)
    assert (config.num_layers, config.num_heads, config.vocab_size) == (2, 4, VOCAB)
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    if case == "gpt2":
        assert (config.architecture, config.intermediate_size, config.rope) == ("gpt2", 256, None)
        assert config.max_position_embeddings == 128 and config.tie_word_embeddings
    else:
        assert config.architecture == "llama"
        assert config.num_kv_heads == kwargs["num_key_value_heads"]
        assert config.rope.rope_type == ("llama3" if case == "llama_rope_llama3" else "default")
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_dir(tmp_path / "missing")


@torch.inference_mode()
def test_gpt2_rejects_positions_past_its_table() -> None:
    _, ours = make_pair("gpt2")
    runner = Runner(ours)
    with pytest.raises(ValueError, match="128 positions"):
        runner.step([runner.backend.new_cache()], [prompt_of(129)])


def test_config_rejects_unsupported_inputs() -> None:
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(ValueError, match="falcon"):
        ModelConfig.from_hf_dict({**base, "model_type": "falcon"})
    longrope = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": longrope})
    with pytest.raises(ValueError, match="low_freq_factor"):
        ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8}})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_hf_dict({**base, "num_key_value_heads": 3})


def test_load_reports_missing_and_unexpected_keys() -> None:
    hf, ours = make_pair("llama_untied")
    state = dict(hf.state_dict())
    del state["lm_head.weight"]
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): lm_head.weight") as err:
        ours.load_hf_state_dict(state)
    assert "model.layers.0.self_attn.extra.weight" in str(err.value)
    state = dict(hf.state_dict())
    state["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape mismatch for norm.weight"):
        ours.load_hf_state_dict(state)


def test_cache_shape_matches_config() -> None:
    _, ours = make_pair("qwen2")
    assert ours.cache_shape() == CacheShape(2, 1, 16)
