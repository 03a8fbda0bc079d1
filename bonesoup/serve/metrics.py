"""Prometheus metrics of one server, through prometheus_client (one CollectorRegistry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_REMERGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's counters and histograms, in a registry of their own (two apps never share one).

    ``render()`` is ``generate_latest(registry)``, the body of ``GET /metrics``.
    """

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.remerge = Histogram("bonesoup_remerge_seconds", "Wall time of LiveSoup.set_preference re-merges.",
                                 registry=r, buckets=_REMERGE_BUCKETS)
        self.generation = Histogram("bonesoup_generation_seconds", "Wall time of one guided_generate call.",
                                    registry=r, buckets=_LATENCY_BUCKETS)
        self.request = Histogram("bonesoup_completion_request_seconds",
                                 "End-to-end latency of /v1/completions requests (queueing included).",
                                 registry=r, buckets=_LATENCY_BUCKETS)
        self.batch_rows = Histogram("bonesoup_generation_batch_rows", "Prompts per guided_generate call.",
                                    registry=r, buckets=_ROWS_BUCKETS)
        self.requests = Counter("bonesoup_requests", "HTTP requests by endpoint and status code.",
                                ("endpoint", "code"), registry=r)
        self.errors = Counter("bonesoup_request_errors", "HTTP requests answered with a 4xx or 5xx status.",
                              ("endpoint", "code"), registry=r)
        self.remerges = Counter("bonesoup_remerges", "Re-merges by reason (a request's preference, or "
                                "/v1/preference).", ("reason",), registry=r)
        self.prompt_tokens = Counter("bonesoup_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("bonesoup_completion_tokens", "Completion tokens generated.", registry=r)
        self.weights_version = Gauge("bonesoup_weights_version", "Version of the live weights (re-merges so far).",
                                     registry=r)
        self.queue_depth = Gauge("bonesoup_queue_depth", "Requests waiting for the engine.", registry=r)

    def count_request(self, endpoint: str, code: int) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()

    def count_remerge(self, reason: str, seconds: float) -> None:
        self.remerge.observe(seconds)
        self.remerges.labels(reason).inc()

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def totals(self, name: str) -> tuple[float, float]:
        """``(count, sum)`` of the histogram ``name`` (e.g. ``"bonesoup_generation_batch_rows"``)."""
        get = self.registry.get_sample_value
        return get(f"{name}_count") or 0.0, get(f"{name}_sum") or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
