"""RULER-style synthetic long-context tasks, generated locally and deterministically.

Each task builds a haystack of filler sentences up to a target token count, hides the
facts (needles) at a chosen depth, and asks for them; scoring is RULER's
string-match-all: the fraction of expected answers that appear in the output.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = (
    "apple river stone cloud maple tiger lemon violet harbor candle falcon meadow copper "
    "silver orchid thunder pepper willow garnet lantern"
).split()


@dataclass(frozen=True)
class TaskInstance:
    task: str
    length: int  # target prompt length in tokens
    depth: float  # 0 = needle at the start of the haystack, 1 = at the end
    prompt: str
    answers: list[str]
    max_tokens: int


def string_match_all(output: str, answers: list[str]) -> float:
    """RULER's metric: the share of answers found (case-insensitive) in the output."""
    low = output.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def _seven_digits(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _fill(tokenizer: Any, budget: int, needles: list[str], depth: float, noise: str = NOISE) -> str:
    """Noise repeated to about `budget` tokens with the needles inserted at `depth`."""
    per_noise = max(1, len(tokenizer.encode(noise, add_special_tokens=False)))
    needle_tokens = sum(len(tokenizer.encode(n, add_special_tokens=False)) for n in needles)
    repeats = max(1, (budget - needle_tokens) // per_noise)
    at = round(depth * repeats)
    parts = [noise] * repeats
    return "".join(parts[:at]) + "".join(needles) + "".join(parts[at:])


def _frame(context: str, question: str, answer_prefix: str) -> str:
    return (
        "Some special magic facts are hidden inside the following text. Memorize them.\n"
        f"{context}\n{question}\n{answer_prefix}"
    )


def niah_single(tokenizer: Any, length: int, depth: float, rng: random.Random) -> TaskInstance:
    key, value = rng.choice(WORDS), _seven_digits(rng)
    needle = f"One of the special magic numbers for {key} is: {value}. "
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    body = _fill(tokenizer, length - 80, [needle], depth)
    prompt = _frame(body, question, f"The special magic number for {key} mentioned is")
    return TaskInstance("niah_single", length, depth, prompt, [value], 12)


def niah_multikey(tokenizer: Any, length: int, depth: float, rng: random.Random) -> TaskInstance:
    """One needle to find among distractor needles with other uuid keys."""
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(4)]
    key, value = pairs[0]
    needles = [f"One of the special magic uuids for {k} is: {v}. " for k, v in pairs]
    body_budget = length - 320
    distractors = needles[1:]
    rng.shuffle(distractors)
    # The target needle at `depth`, the distractors spread elsewhere.
    body = _fill(tokenizer, body_budget, [needles[0]], depth)
    sentences = body.split(". ")
    for d in distractors:
        sentences.insert(rng.randrange(len(sentences)), d.rstrip(". "))
    body = ". ".join(sentences)
    question = f"What is the special magic uuid for {key} mentioned in the provided text?"
    prompt = _frame(body, question, f"The special magic uuid for {key} mentioned is")
    return TaskInstance("niah_multikey", length, depth, prompt, [value], 32)


def variable_tracking(
    tokenizer: Any, length: int, depth: float, rng: random.Random
) -> TaskInstance:
    """A chain VAR A = 12345, VAR B = VAR A, ...; the answer is every name in the chain."""
    value = str(rng.randint(10_000, 99_999))
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(4)]
    chain = [f"VAR {names[0]} = {value}. "]
    chain += [f"VAR {names[i]} = VAR {names[i - 1]}. " for i in range(1, len(names))]
    body = _fill(tokenizer, length - 100, chain, depth)
    question = f"Find all variables that are assigned the value {value} in the text above."
    prompt = _frame(body, question, f"Answer: The variables assigned the value {value} are:")
    return TaskInstance("variable_tracking", length, depth, prompt, names, 30)


def passkey(tokenizer: Any, length: int, depth: float, rng: random.Random) -> TaskInstance:
    key = str(rng.randint(10_000, 99_999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    body = _fill(tokenizer, length - 60, [needle], depth)
    prompt = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and "
        f"memorize it.\n{body}\nWhat is the pass key? The pass key is"
    )
    return TaskInstance("passkey", length, depth, prompt, [key], 8)


TASKS: dict[str, Callable[[Any, int, float, random.Random], TaskInstance]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "variable_tracking": variable_tracking,
    "passkey": passkey,
}


def depths(count: int) -> list[float]:
    """`count` evenly spaced depths from 0 to 1."""
    return [i / (count - 1) for i in range(count)] if count > 1 else [0.5]


def make_instances(
    tokenizer: Any, tasks: list[str], lengths: list[int], num_depths: int, seed: int = 0
) -> list[TaskInstance]:
    """Every task x length x depth, each with its own seeded random facts."""
    out = []
    for task in tasks:
        for length in lengths:
            for i, depth in enumerate(depths(num_depths)):
                rng = random.Random(f"{seed}-{task}-{length}-{i}")
                out.append(TASKS[task](tokenizer, length, depth, rng))
    return out
