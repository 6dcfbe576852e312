"""A benchmark's peer in a child process: one request line in, one JSON line out.

Peers (transformers, llama.cpp) run there so that they keep libgomp's default OpenMP
wait policy while ours, in the parent, runs with the server's passive workers: the
policy is read once, when OpenMP loads, so one process cannot hold both.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any


class ChildWorker:
    """`cmd` started with libgomp's default wait policy, unless the user set one
    (`user_policy`) or `same_env` asks for the parent's environment."""

    def __init__(self, cmd: list[str], user_policy: str | None, same_env: bool = False) -> None:
        env = dict(os.environ)
        if not same_env and user_policy is None:
            env.pop("OMP_WAIT_POLICY", None)  # the policy only we set
        self.wait_policy = env.get("OMP_WAIT_POLICY", "libgomp default")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, request: str) -> Any:
        """Send one request line; the child's JSON answer."""
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's child process exited (see its stderr above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
