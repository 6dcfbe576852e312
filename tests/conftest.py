"""Shared fixtures: the real default model in-process, and a real server process."""

from __future__ import annotations

import pytest

from tests.support.server_process import ServerProcess


@pytest.fixture(scope="session")
def default_model_dir():
    from engine.model_files import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def llm(default_model_dir):
    """The default model behind the offline API (full attention, fp32)."""
    from engine.llm import LLM

    return LLM()


@pytest.fixture(scope="session")
def server(default_model_dir):
    """One `longserve serve` process with the default model, shared by the session."""
    with ServerProcess("--max-model-len", "2048") as proc:
        yield proc


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir):
    """A random 2-layer Llama saved as a local Hugging Face directory.

    It reuses the default model's tokenizer, so prompts and text work as usual, and has
    peaked logits (large init) so greedy decoding rarely meets near-ties. Engine tests
    that need many long prompts use it: the 30-layer model is too slow on 2 CPU cores.
    """
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, path / name)
    return path
