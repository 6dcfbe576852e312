"""Lettered multiple-choice data: items, the raw prompt format, and readers.

An item is a question, its options and the index of the gold option. Prompts use the
raw format of issue 7:

    Question: <question>
    Answer Choices:
    A: <option>
    B: <option>
    ...
    Answer:

and the prediction is the option letter (" A", " B", ...) with the highest next-token
logit after "Answer:".

Readers:
- JSONL, one `{"question": str, "options": [str, ...], "answer": int}` per line.
- TruthfulQA csv (columns `Question`, `Best Answer`, `Incorrect Answers`, ";"-separated):
  the options are the best answer plus the first `num_options - 1` incorrect answers, in
  an order shuffled with a fixed seed; questions with fewer incorrect answers are skipped.
  With `rotate=True` (the default) every question appears `num_options` times, as the
  cyclic rotations of its shuffled options, so the gold letter is spread exactly evenly.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question; `answer` indexes `options`."""

    question: str
    options: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question must be a non-empty string")
        if not 2 <= len(self.options) <= len(LETTERS):
            raise ValueError(f"an item needs 2 to {len(LETTERS)} options, got {len(self.options)}")
        if any(not isinstance(o, str) or not o.strip() for o in self.options):
            raise ValueError("options must be non-empty strings")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise ValueError(f"answer must be an integer index, got {self.answer!r}")
        if not 0 <= self.answer < len(self.options):
            n = len(self.options)
            raise ValueError(f"answer {self.answer} is out of range for {n} options")

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    def rotated(self, shift: int) -> MCItem:
        """The same item with its options rotated left by `shift` (gold moves with them)."""
        n = len(self.options)
        options = tuple(self.options[(i + shift) % n] for i in range(n))
        return MCItem(self.question, options, (self.answer - shift) % n)

    def rotations(self) -> list[MCItem]:
        """All cyclic rotations: the gold answer appears once under every letter."""
        return [self.rotated(s) for s in range(len(self.options))]


def format_prompt(item: MCItem) -> str:
    """The raw lettered prompt; the answer letter is the next token after 'Answer:'."""
    lines = [f"Question: {item.question.strip()}", "Answer Choices:"]
    lines += [
        f"{letter}: {opt.strip()}" for letter, opt in zip(item.letters, item.options, strict=True)
    ]
    lines.append("Answer:")
    return "\n".join(lines)


def letter_token_ids(tokenizer, num_options: int) -> list[int]:
    """Token ids of " A", " B", ...; ValueError if a letter is not a single token."""
    ids = []
    for letter in LETTERS[:num_options]:
        tokens = tokenizer.encode(" " + letter, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(f"option letter {letter!r} is not one token: {tokens}")
        ids.append(tokens[0])
    return ids


def read_truthfulqa_csv(
    path: str | Path, num_options: int = 4, seed: int = 0, rotate: bool = True
) -> list[MCItem]:
    """TruthfulQA MC1 items from the LoFiT csv split (see the module docstring)."""
    rng = random.Random(seed)
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for row_num, row in enumerate(csv.DictReader(f), start=2):
            try:
                question, best = row["Question"], row["Best Answer"]
                incorrect = [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()]
            except (KeyError, AttributeError) as exc:
                raise ValueError(f"{path}:{row_num}: missing TruthfulQA column {exc}") from exc
            if len(incorrect) < num_options - 1:
                continue
            options = [best.strip(), *incorrect[: num_options - 1]]
            order = list(range(num_options))
            rng.shuffle(order)
            item = MCItem(question, tuple(options[i] for i in order), order.index(0))
            items.extend(item.rotations() if rotate else [item])
    if not items:
        raise ValueError(f"{path}: no question has {num_options - 1} incorrect answers")
    return items


def read_jsonl(path: str | Path) -> list[MCItem]:
    """Items from JSONL lines `{"question", "options": [...], "answer": index}`."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                items.append(MCItem(obj["question"], tuple(obj["options"]), obj["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line_num}: not a multiple-choice item: {exc}") from exc
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def read_items(path: str | Path, num_options: int = 4, seed: int = 0) -> list[MCItem]:
    """Items from a TruthfulQA `.csv` or a `.jsonl` file (chosen by extension)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".csv":
        return read_truthfulqa_csv(path, num_options, seed)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise ValueError(f"data file {str(path)!r} must be a TruthfulQA .csv or a .jsonl")
