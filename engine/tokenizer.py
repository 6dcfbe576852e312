"""Load a model's tokenizer from its directory and render chat prompts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.model_files import ModelLoadError


def load_tokenizer(model_dir: Path) -> Any:
    """The Hugging Face fast tokenizer stored beside the weights (never fetched)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a missing/bad tokenizer
        raise ModelLoadError(f"cannot load tokenizer from {model_dir}: {exc}") from exc


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
    """Apply the tokenizer's chat template, ending with the assistant's turn opening."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use completions instead")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    except Exception as exc:  # jinja errors for malformed messages
        raise ValueError(f"messages: cannot apply the chat template: {exc}") from exc


def eos_token_ids(tokenizer: Any, config_eos: list[int]) -> frozenset[int]:
    """Every id that ends generation: the config's eos ids plus the tokenizer's."""
    ids = set(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
