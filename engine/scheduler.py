"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first:
decodes take one token, a prompt still being prefilled takes a chunk of what is left, so
a long prompt is spread over many steps while the others keep decoding. Waiting
sequences join as budget and seats allow. When the running set would need more
device-tier tokens than the budget allows, the newest sequence is preempted: its cache
is freed and it is recomputed from its tokens later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_device_tokens: int | None = None  # device-tier tokens across running sequences


@dataclass
class ScheduledStep:
    """The work of one step: (sequence, number of new tokens) in packing order."""

    work: list[tuple[Sequence, int]]
    preempted: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.work


class Scheduler:
    """Waiting and running queues with chunked prefill and preemption by recompute."""

    def __init__(
        self,
        config: SchedulerConfig,
        allocate: Callable[[Sequence], None],
        release: Callable[[Sequence], None],
        device_tokens: Callable[[Sequence, int], int],
    ) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._allocate = allocate
        self._release = release
        self._device_tokens = device_tokens  # (seq, num_new) -> device-tier tokens after step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from whichever queue holds it and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.cache is not None:
            self._release(seq)

    def schedule(self) -> ScheduledStep:
        budget = self.config.max_num_batched_tokens
        work: list[tuple[Sequence, int]] = []
        preempted = self._preempt_to_fit()
        device_used = 0
        for seq in self.running:
            if budget <= 0:
                break
            n = self._chunk(seq, budget)
            work.append((seq, n))
            budget -= n
            device_used += self._device_tokens(seq, n)
        limit = self.config.max_device_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self._chunk(seq, budget)
            need = self._device_tokens(seq, n)
            if limit is not None and self.running and device_used + need > limit:
                break
            self.waiting.popleft()
            self._allocate(seq)  # a prefix-cache hit computes part of the prompt
            n = self._chunk(seq, budget)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            work.append((seq, n))
            budget -= n
            device_used += self._device_tokens(seq, n)
        return ScheduledStep(work=work, preempted=preempted)

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """Tokens `seq` computes next: a prefill chunk ends at its snapshot boundary."""
        n = min(seq.num_uncomputed, budget)
        if seq.snapshot_at is not None and seq.num_computed < seq.snapshot_at:
            n = min(n, seq.snapshot_at - seq.num_computed)
        return n

    def _preempt_to_fit(self) -> list[Sequence]:
        limit = self.config.max_device_tokens
        preempted: list[Sequence] = []
        if limit is None:
            return preempted

        def need() -> int:
            return sum(self._device_tokens(s, min(s.num_uncomputed, 1)) for s in self.running)

        while len(self.running) > 1 and need() > limit:
            victim = self.running.pop()
            self._release(victim)
            victim.num_computed = 0
            victim.num_preemptions += 1
            victim.status = SequenceStatus.WAITING
            self.waiting.appendleft(victim)
            preempted.append(victim)
        return preempted

    def finish(self, seq: Sequence) -> None:
        """Take a finished sequence out of the running set and free its cache."""
        seq.status = SequenceStatus.FINISHED
        self.remove(seq)
