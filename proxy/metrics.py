"""Prometheus collectors for one gateway, correct across granian workers.

With several workers the CLI sets PROMETHEUS_MULTIPROC_DIR before any worker imports
prometheus_client; each worker then writes its values to mmap files in that folder and
/metrics aggregates them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from proxy.call import Call

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_MODEL_LABELS = 500
MAX_CUSTOMER_LABELS = 1000
CHUNK_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The gateway's collectors. One instance per app; tests get a private registry each."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry
        self.requests = Counter(
            "llmrelay_requests", "Requests by model, provider and status code", ["model", "provider", "status"], registry=r
        )
        self.latency = Histogram(
            "llmrelay_request_latency_seconds", "Whole-request latency", ["model", "provider"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "llmrelay_time_to_first_token_seconds", "Time to the first streamed content chunk", ["model", "provider"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "llmrelay_gateway_overhead_seconds", "Time the gateway added: total minus upstream time",
            buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.tokens = Counter("llmrelay_tokens", "Tokens by model, provider and kind", ["model", "provider", "kind"], registry=r)
        self.cost = Counter("llmrelay_cost_usd", "Cost in USD by model and provider", ["model", "provider"], registry=r)
        self.in_flight = Gauge("llmrelay_in_flight_requests", "Requests being served", registry=r, multiprocess_mode="livesum")
        self.log_queue_depth = Gauge(
            "llmrelay_log_queue_depth", "Log records waiting for the writer", registry=r, multiprocess_mode="livesum"
        )
        self.log_written = Counter("llmrelay_log_records_written", "Log records written to a sink", ["sink"], registry=r)
        self.log_spilled = Counter(
            "llmrelay_log_records_spilled", "Log records spilled to the local spool (queue full or sink down)", registry=r
        )
        self.log_rejected = Counter(
            "llmrelay_log_records_rejected", "Log records a sink refused for good, kept in <sink>.rejected.jsonl "
            "in the spool folder", ["sink"], registry=r,
        )
        self.log_replayed = Counter("llmrelay_log_records_replayed", "Spooled log records replayed into a sink", registry=r)
        self.log_spool_errors = Counter(
            "llmrelay_log_spool_errors", "Failures to write the spool itself (disk full, permissions)", registry=r
        )
        self.attempts = Counter(
            "llmrelay_attempts", "Upstream attempts by provider and outcome (success, failure)", ["provider", "outcome"],
            registry=r,
        )
        self.retries = Counter("llmrelay_retries", "Retries of the same candidate, by reason", ["reason"], registry=r)
        self.fallbacks = Counter("llmrelay_fallbacks", "Moves to the next candidate, by reason", ["reason"], registry=r)
        self.cooldowns_entered = Counter(
            "llmrelay_cooldowns_entered", "Deployments taken out of rotation", ["provider", "deployment"], registry=r
        )
        self.deployment_cooling = Gauge(
            "llmrelay_deployment_cooling", "1 while a deployment is in cooldown", ["provider", "deployment"],
            registry=r, multiprocess_mode="max",
        )
        self.cache_lookups = Counter(
            "llmrelay_cache_lookups", "Response cache lookups by result (hit, miss)", ["result"], registry=r
        )
        self.cache_stores = Counter("llmrelay_cache_stores", "Answers written to the response cache", registry=r)
        self.limit_blocks = Counter(
            "llmrelay_limit_blocks", "Requests refused by a limit (429), by scope and metric", ["scope", "metric"],
            registry=r,
        )
        self.limit_warnings = Counter(
            "llmrelay_limit_warnings", "Warn thresholds crossed, by scope and metric", ["scope", "metric"], registry=r
        )
        self.limit_backend_errors = Counter(
            "llmrelay_limit_backend_errors", "Limit checks the counter backend could not answer, by outcome (open, closed)",
            ["outcome"], registry=r,
        )
        self.chunk_gap = Histogram(
            "llmrelay_stream_chunk_gap_seconds", "Inter-chunk latency: time between two chunks of a stream",
            ["provider"], buckets=CHUNK_GAP_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "llmrelay_queue_time_seconds", "Time from a request's arrival to its first upstream attempt",
            buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.customer_cost = Counter(
            "llmrelay_customer_cost_usd", f"Cost in USD by customer_identifier (the first {MAX_CUSTOMER_LABELS} "
            "customers; the rest as 'other'; 'none' without one)", ["customer"], registry=r,
        )
        self.logs_ingested = Counter(
            "llmrelay_logs_ingested", "Log records received by the ingestion API, by endpoint", ["endpoint"], registry=r
        )
        self.log_retention = Counter(
            "llmrelay_log_retention_rows", "Log rows retention blurred or deleted", ["action"], registry=r
        )
        self.alerts_sent = Counter("llmrelay_alerts_sent", "Alerts delivered, by channel", ["channel"], registry=r)
        self.alerts_failed = Counter(
            "llmrelay_alerts_failed", "Alerts given up after all retries (or dropped when the queue was full), by channel",
            ["channel"], registry=r,
        )
        # labels() costs a dict lookup plus locking; keep the children we have seen.
        self._children: dict[tuple[str, str, int], tuple] = {}
        # Every label value lives in the registry for good: past this many model names, new
        # ones are counted as "other", so no client can grow /metrics without bound.
        self._models: set[str] = set()
        self._customers: dict[str, Any] = {}  # customer -> its customer_cost child

    def observe(self, call: Call) -> None:
        """Record one finished request. Runs on the request path: no I/O beyond mmap writes."""
        if call.target is not None:
            model = call.response_model or call.model or "unknown"
            provider = call.target.provider
        else:  # never routed (bad key, unknown model, bad body): the requested name is the client's
            # text, and a label per value would let anyone, even without a key, grow /metrics forever
            model = provider = "none"
        if model not in self._models:
            if len(self._models) >= MAX_MODEL_LABELS:
                model = "other"
            else:
                self._models.add(model)
        key = (model, provider, call.status_code)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(model, provider, str(call.status_code)),
                self.latency.labels(model, provider),
                self.ttft.labels(model, provider),
                self.tokens.labels(model, provider, "prompt"),
                self.tokens.labels(model, provider, "completion"),
                self.cost.labels(model, provider),
            )
            self._children[key] = children
        requests, latency, ttft, prompt_tokens, completion_tokens, cost = children
        requests.inc()
        total = call.elapsed()
        latency.observe(total)
        if call.ttft is not None:
            ttft.observe(call.ttft)
        self.overhead.observe(max(total - call.upstream_time, 0.0))
        if call.usage.prompt_tokens:
            prompt_tokens.inc(call.usage.prompt_tokens)
        if call.usage.completion_tokens:
            completion_tokens.inc(call.usage.completion_tokens)
        if call.cost:
            cost.inc(call.cost)
            customer = call.params.customer() or "none"
            child = self._customers.get(customer)
            if child is None:
                if len(self._customers) >= MAX_CUSTOMER_LABELS:
                    customer = "other"
                child = self._customers.get(customer) or self.customer_cost.labels(customer)
                if len(self._customers) < MAX_CUSTOMER_LABELS or customer == "other":
                    self._customers[customer] = child
            child.inc(call.cost)
        if call.dispatched:
            self.queue_time.observe(call.dispatched - call.started)

    def observe_chunk_gaps(self, provider: str, counts: list[int], total: float) -> None:
        """Add one stream's inter-chunk gaps, counted per CHUNK_GAP_BUCKETS bucket by the relay
        (`counts` has one more slot for +Inf), to the histogram in one step instead of one
        observe() per chunk. prometheus_client has no public bulk-observe: this writes the
        histogram child's bucket and sum values the way observe() does."""
        child = self.chunk_gap.labels(provider)
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
        child._sum.inc(total)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop a stopped worker's live gauges from the multiprocess files."""
    if multiprocess_dir():
        prom_multiprocess.mark_process_dead(pid)
