"""Prometheus metrics named in vLLM's style (`longserve:...`).

Request latencies are observed by the HTTP layer as deltas stream out; engine state
(queues, KV bytes per tier, index searches, preemptions, queue times) is read from the
engine at scrape time.
"""

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
        self._preemptions_seen = 0
        self._scanned_seen = 0
        self._searches_seen = 0
        self._prefix_seen: dict[str, int] = {}

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"longserve:{name}", doc, labels, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"longserve:{name}", doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"longserve:{name}", doc, buckets=buckets, registry=r)

        self.running = gauge("num_requests_running", "Sequences in the running batch")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled")
        self.kv_bytes = gauge("kv_cache_bytes", "KV-cache bytes held, by tier", ("tier",))
        self.kv_tokens = gauge("kv_cache_tokens", "KV-cache tokens held, by tier", ("tier",))
        self.preemptions = counter("num_preemptions", "Sequences preempted (recomputed later)")
        self.searches = counter("index_searches", "Host-tier index searches (one per head)")
        self.keys_scanned = counter("index_keys_scanned", "Host-tier keys scored by searches")
        self.scanned_per_search = gauge(
            "index_keys_scanned_per_search", "Mean keys scored per host-tier search so far"
        )
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prefix-cache lookups (one per sequence allocation)"
        )
        self.prefix_query_tokens = counter(
            "prefix_cache_query_tokens", "Tokens of the sequences looked up in the prefix cache"
        )
        self.prefix_hits = counter("prefix_cache_hits", "Prefix-cache lookups that found a prefix")
        self.prefix_hit_tokens = counter(
            "prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache (not prefilled)"
        )
        self.prefix_evictions = counter(
            "prefix_cache_evictions", "Prefix-cache entries evicted (LRU, to stay within the limit)"
        )
        self.prefix_bytes = gauge(
            "prefix_cache_bytes", "Bytes held by the prefix cache (KV of both tiers, indexes)"
        )
        self.prefix_entries = gauge("prefix_cache_entries", "Prefixes held by the prefix cache")
        self.requests = counter(
            "request_success", "Finished requests by finish reason", ("finished_reason",)
        )
        self.aborted = counter("request_aborted", "Requests ended early (client gone, error)")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between streamed tokens", _TOKEN_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to last token", _LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled step", _LATENCY_BUCKETS
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
            self.preemptions.inc(engine.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = engine.num_preemptions
            retrieval = engine.retrieval_stats()
            searches, scanned = retrieval.get("queries", 0), retrieval.get("scanned", 0)
            self.searches.inc(max(searches - self._searches_seen, 0))
            self.keys_scanned.inc(max(scanned - self._scanned_seen, 0))
            self._searches_seen, self._scanned_seen = searches, scanned
            self.scanned_per_search.set(scanned / searches if searches else 0)
            self._render_prefix_cache(engine.prefix_cache.stats())
            while engine.queue_times:
                self.queue_time.observe(engine.queue_times.popleft())
        return generate_latest(self.registry)

    def _render_prefix_cache(self, stats: dict[str, int]) -> None:
        counters = {
            "queries": self.prefix_queries,
            "query_tokens": self.prefix_query_tokens,
            "hits": self.prefix_hits,
            "hit_tokens": self.prefix_hit_tokens,
            "evictions": self.prefix_evictions,
        }
        for name, metric in counters.items():
            metric.inc(max(stats[name] - self._prefix_seen.get(name, 0), 0))
            self._prefix_seen[name] = stats[name]
        self.prefix_bytes.set(stats["bytes"])
        self.prefix_entries.set(stats["entries"])


class RequestTimer:
    """Observes one request's TTFT, inter-token latencies and end-to-end latency."""

    def __init__(self, metrics: Metrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: float | None = None
        self.prompt_tokens = 0
        self.finish_reason: str | None = None

    def token(self, now: float, count: int, prompt_tokens: int, finish: str | None) -> None:
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.prompt_tokens = prompt_tokens
        self.finish_reason = finish or self.finish_reason
        self.metrics.generation_tokens.inc(count)

    def done(self, now: float, completed: bool) -> None:
        if not completed:
            self.metrics.aborted.inc()
            return
        self.metrics.requests.labels(self.finish_reason or "stop").inc()
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.e2e.observe(now - self.start)
