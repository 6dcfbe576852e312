"""A small Dockerfile reader: instructions by stage, ARG/ENV values, exec-form commands.

Enough for our own Dockerfiles (tests/test_docker.py); not a general BuildKit parser.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the instruction, continuations joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Instructions in order, comments dropped and `\\` continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


def expand(value: str, env: dict[str, str]) -> str:
    """Substitute $NAME and ${NAME} from `env` (unknown names become empty)."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def key_values(args: str) -> dict[str, str]:
    """`A=1 B="two words"` (ENV/ARG syntax) as a dict; a bare `ARG NAME` maps to ''."""
    pairs = {}
    for word in shlex.split(args):
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD."""
    value = json.loads(args)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not an exec-form array: {args}")
    return value


@dataclass
class Dockerfile:
    global_args: dict[str, str]  # ARGs before the first FROM
    stages: list[Stage]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        for ins in instructions(path.read_text()):
            if ins.keyword == "FROM":
                words = ins.args.split()
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                stages.append(Stage(expand(words[0], global_args), name))
            elif not stages:
                if ins.keyword != "ARG":
                    raise ValueError(f"{path}: {ins.keyword} before FROM")
                global_args.update(key_values(ins.args))
            else:
                stages[-1].instructions.append(ins)
        return cls(global_args, stages)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """The final stage's HEALTHCHECK options and its exec-form command."""
        [ins] = self.final.all("HEALTHCHECK")
        options, _, command = ins.args.partition("CMD ")
        opts = dict(o.lstrip("-").split("=", 1) for o in options.split())
        return opts, exec_form(command)
