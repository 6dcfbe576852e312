"""Prometheus metrics: engine queue sizes and KV-cache bytes per tier, read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from engine.llm_engine import LLMEngine


class Metrics:
    """A private registry so several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine: LLMEngine | None = None
        self.running = Gauge(
            "longserve_num_requests_running",
            "Sequences in the running batch",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "longserve_num_requests_waiting",
            "Sequences waiting to be scheduled",
            registry=self.registry,
        )
        self.kv_bytes = Gauge(
            "longserve_kv_cache_bytes",
            "KV-cache bytes held, by tier",
            ["tier"],
            registry=self.registry,
        )
        self.kv_tokens = Gauge(
            "longserve_kv_cache_tokens",
            "KV-cache tokens held, by tier",
            ["tier"],
            registry=self.registry,
        )

    def bind(self, engine: LLMEngine) -> None:
        self._engine = engine

    def render(self) -> bytes:
        engine = self._engine
        if engine is not None:
            self.running.set(engine.num_running)
            self.waiting.set(engine.num_waiting)
            stats = engine.memory_stats()
            for tier in ("device", "host"):
                self.kv_bytes.labels(tier).set(stats.get(f"{tier}_bytes", 0))
                self.kv_tokens.labels(tier).set(stats.get(f"{tier}_tokens", 0))
        return generate_latest(self.registry)
