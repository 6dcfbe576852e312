"""Benchmark prompts: random tokens, long documents with a short question, or ShareGPT.

Every dataset is generated locally and seeded; nothing is downloaded. Long documents are
built from the docstrings of Python's standard library, which every install ships.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

DATASETS = ("random", "longctx", "sharegpt")

# Standard-library modules whose docstrings make up the long documents.
_CORPUS_MODULES = (
    "argparse asyncio collections csv dataclasses datetime decimal email.message functools "
    "http.client inspect itertools json logging os pathlib re shutil socket statistics string "
    "subprocess textwrap threading typing unittest urllib.parse zipfile"
).split()


@dataclass
class BenchRequest:
    """One prompt: text, or token ids (sent as such to /v1/completions)."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


class TextTokenizer:
    """The `tokenizers` tokenizer of a local model directory (no torch, no transformers)."""

    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"no tokenizer.json in {model_dir} (pass --tokenizer DIR)")
        self._tok = Tokenizer.from_file(str(path))
        special = set(self._tok.get_added_tokens_decoder())
        self.ordinary_ids = [i for i in range(self._tok.get_vocab_size()) if i not in special]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    low, high = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
    return [max(1, rng.randint(low, high)) for _ in range(n)]


def random_requests(
    tok: TextTokenizer,
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompts of random ordinary tokens; lengths uniform in mean × [1 − r, 1 + r]."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    rng = random.Random(seed)
    ins = _lengths(rng, n, input_len, range_ratio)
    outs = _lengths(rng, n, output_len, range_ratio)
    return [
        BenchRequest(rng.choices(tok.ordinary_ids, k=i), i, o)
        for i, o in zip(ins, outs, strict=True)
    ]


def _corpus_paragraphs() -> list[str]:
    paragraphs: list[str] = []
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when read
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in _CORPUS_MODULES:
            module = importlib.import_module(name)
            docs = [inspect.getdoc(module)]
            for attr in sorted(vars(module)):
                obj = getattr(module, attr)
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    docs.append(inspect.getdoc(obj))
            for doc in filter(None, docs):
                paragraphs += [p.strip() for p in doc.split("\n\n") if p.strip()]
    return paragraphs


def longctx_requests(
    tok: TextTokenizer, n: int, doc_len: int, output_len: int, seed: int = 0
) -> list[BenchRequest]:
    """Long documents (about `doc_len` tokens of stdlib docstrings, a different passage
    each) with one fact hidden at a random depth, and a short question about it."""
    if doc_len < 16 or output_len < 1:
        raise ValueError("--longctx-doc-len must be >= 16 and --longctx-output-len >= 1")
    rng = random.Random(seed)
    paragraphs = _corpus_paragraphs()
    sizes = [len(tok.encode(p)) + 1 for p in paragraphs]
    requests = []
    for i in range(n):
        code = rng.randint(10000, 99999)
        fact = f"The secret code of document {i} is {code}."
        budget = doc_len - len(tok.encode(fact)) - 1
        start, parts, used = rng.randrange(len(paragraphs)), [], 0
        while used < budget:
            j = (start + len(parts)) % len(paragraphs)
            parts.append(paragraphs[j])
            used += sizes[j]
        parts.insert(rng.randint(0, len(parts)), fact)
        prompt = (
            "Read the document below and answer the question after it.\n\n<document>\n"
            + "\n\n".join(parts)
            + f"\n</document>\n\nQuestion: what is the secret code of document {i}? "
            "Answer with the number only.\nAnswer:"
        )
        requests.append(BenchRequest(prompt, len(tok.encode(prompt)), output_len))
    return requests


def sharegpt_requests(
    tok: TextTokenizer,
    path: str | Path,
    n: int,
    output_len: int | None = None,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[BenchRequest]:
    """First human turn as the prompt, the reply's length as the output length (or
    `output_len`). Like vLLM, drops pairs under 4 tokens or too long; repeats the file's
    conversations when it has fewer than `n`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read ShareGPT file {path}: {exc}") from None
    pairs = []
    for item in data if isinstance(data, list) else []:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if isinstance(prompt, str) and isinstance(reply, str):
            pairs.append((prompt, reply))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        p_len, reply_len = len(tok.encode(prompt)), len(tok.encode(reply))
        o_len = output_len or reply_len
        if p_len < 4 or reply_len < 4 or p_len > max_prompt_len or p_len + o_len > max_total_len:
            continue
        requests.append(BenchRequest(prompt, p_len, o_len))
    if not requests:
        raise ValueError(f"{path} has no usable ShareGPT conversations")
    return [requests[i % len(requests)] for i in range(n)]
