"""Prometheus metrics: request latencies observed by the server, engine state read at scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class Metrics:
    """A private registry so several apps in one process (tests) never collide."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._engine: LLMEngine | None = None
        self.running = Gauge("longserve_num_requests_running", "Sequences running", registry=r)
        self.waiting = Gauge("longserve_num_requests_waiting", "Sequences waiting", registry=r)
        self.kv_bytes = Gauge(
            "longserve_kv_cache_bytes", "KV-cache bytes held, by tier", ["tier"], registry=r
        )
        self.kv_tokens = Gauge(
            "longserve_kv_cache_tokens", "KV-cache tokens held, by tier", ["tier"], registry=r
        )
        self.keys_scanned = Gauge(
            "longserve_retrieval_keys_scanned_total",
            "Host-tier keys scanned by index searches since start",
            registry=r,
        )
        self.searches = Gauge(
            "longserve_retrieval_searches_total",
            "Host-tier index searches since start",
            registry=r,
        )
        self.requests = Counter(
            "longserve_requests", "Finished requests by outcome", ["outcome"], registry=r
        )
        self.prompt_tokens = Counter(
            "longserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "longserve_generation_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "longserve_time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "longserve_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "longserve_e2e_request_latency_seconds",
            "Request latency, arrival to last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
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
            retrieval = engine.retrieval_stats()
            self.keys_scanned.set(retrieval.get("scanned", 0))
            self.searches.set(retrieval.get("queries", 0))
        return generate_latest(self.registry)


class RequestTimer:
    """Observes one request's TTFT, inter-token latencies and end-to-end latency."""

    def __init__(self, metrics: Metrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: float | None = None
        self.prompt_tokens = 0

    def token(self, now: float, count: int, prompt_tokens: int) -> None:
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.prompt_tokens = prompt_tokens
        self.metrics.generation_tokens.inc(count)

    def done(self, now: float, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()
        if outcome == "finished":
            self.metrics.prompt_tokens.inc(self.prompt_tokens)
            self.metrics.e2e.observe(now - self.start)
