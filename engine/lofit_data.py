"""Training data for LoFiT: `{"prompt", "completion"}` JSONL, and converters into it.

The converters read the CLUTRR and TruthfulQA files shipped in LoFiT's code release (see
`../shared/data/README.md`). The CLUTRR prompt is LoFiT's own template; the answer is
the relation word, followed by a period so generation has a clear place to stop.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One supervised example: the loss covers only `completion`'s tokens."""

    prompt: str
    completion: str


CLUTRR_TEMPLATE = (
    'Read the following story about a family. "{story}" Assume the relations described in '
    "the story are all true. Based on relations between the fictional characters in the "
    "story (assume the relations are all true) and your commonsense knowledge about family "
    "relationship, how is {b} related to {a}? Answer: {b} is {a} 's\n"
)
TRUTHFULQA_TEMPLATE = "Q: {question} A:"


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of `{"prompt", "completion"}` objects; ValueError with the
    line number for anything else."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from exc
            prompt = row.get("prompt") if isinstance(row, dict) else None
            completion = row.get("completion") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
                raise ValueError(
                    f'{path}:{lineno}: expected {{"prompt": str, "completion": non-empty str}}'
                )
            examples.append(Example(prompt, completion))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def save_jsonl(examples: list[Example], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n")


def clutrr_prompt(story: str, query: str) -> str:
    """LoFiT's CLUTRR prompt for a story (names in [brackets]) and a query "('A', 'B')"."""
    names = re.findall(r"'([^']*)'", query)
    if len(names) != 2:
        raise ValueError(f"CLUTRR query must name two people like \"('A', 'B')\", got {query!r}")
    a, b = (n.strip() for n in names)
    story = story.replace("[", "").replace("]", "")
    return CLUTRR_TEMPLATE.format(story=story, a=a, b=b)


def convert_clutrr(path: str | Path) -> list[Example]:
    """CLUTRR rows (`clean_story`/`story`, `query`, `target_text`) as examples whose
    completion is the relation followed by a period."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    examples = []
    for i, row in enumerate(rows):
        try:
            story = row.get("clean_story") or row["story"]
            prompt = clutrr_prompt(story, row["query"])
            examples.append(Example(prompt, row["target_text"].strip() + "."))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: row {i} is not a CLUTRR record: {exc!r}") from exc
    return examples


def clutrr_answer(generated: str) -> str:
    """The answer in a generation: the text up to the first period or line break."""
    return re.split(r"[.\n]", generated.strip(), maxsplit=1)[0].strip()


def convert_truthfulqa(path: str | Path) -> list[Example]:
    """TruthfulQA CSV rows as "Q: ... A:" prompts completed by the best answer."""
    examples = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            question, answer = row.get("Question"), row.get("Best Answer")
            if not question or not answer:
                raise ValueError(f"{path}: row {i} lacks Question or Best Answer")
            examples.append(Example(TRUTHFULQA_TEMPLATE.format(question=question), " " + answer))
    return examples


CONVERTERS = {"clutrr": convert_clutrr, "truthfulqa": convert_truthfulqa}
