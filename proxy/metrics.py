"""Prometheus collectors for one gateway, correct across granian workers.

With several workers the CLI sets PROMETHEUS_MULTIPROC_DIR before any worker imports
prometheus_client; each worker then writes its values to mmap files in that folder and
/metrics aggregates them (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import asyncio
import bisect
import glob
import os
from collections.abc import Callable, Mapping
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
FLUSH_INTERVAL = 0.5  # seconds: how stale a worker's request metrics may be in /metrics
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
        self.internal_entries = Gauge(
            "llmrelay_internal_entries", "Entries in an in-memory map of the gateway, by map; every one has "
            "a bound, so under steady load each stays flat", ["map"], registry=r, multiprocess_mode="max",
        )
        self._sizes: dict[str, Callable[[], Mapping[str, int]]] = {}
        # Every label value lives in the registry for good: past this many model names, new
        # ones are counted as "other", so no client can grow /metrics without bound.
        self._models: set[str] = set()
        self._customers: set[str] = set()
        # What requests observed since the last flush, in plain Python numbers: a request costs
        # a few dict and list updates instead of about 15 locked prometheus_client calls.
        self._series: dict[tuple[str, str, int], _Series] = {}
        self._overhead = _Buckets(OVERHEAD_BUCKETS)
        self._queue_time = _Buckets(OVERHEAD_BUCKETS)
        self._customer_cost: dict[str, float] = {}
        self._chunk_gaps: dict[str, _Buckets] = {}
        self._counts: dict[Any, int] = {}  # counter children -> increments not yet applied
        self.in_flight_now = 0  # requests being served by this process
        self._config_loaded: Gauge | None = None  # set_config() makes these
        self._config_info: Gauge | None = None

    def track_sizes(self, owner: str, sizes: Callable[[], Mapping[str, int]]) -> None:
        """Report each of `sizes()` as llmrelay_internal_entries{map="<owner>.<name>"} at every flush
        (a leak shows as growth)."""
        self._sizes[owner] = sizes

    def sizes(self) -> dict[str, int]:
        return {"model_labels": len(self._models), "customer_labels": len(self._customers)}

    def set_config(self, sha256: str, loaded_at: float) -> None:
        """The config this worker serves: when it was loaded, and its hash as a label. Made on
        first use, so that a process that only checks a config (the CLI's main process) adds no
        series. With several workers, one series per live worker (label pid)."""
        if self._config_loaded is None:
            self._config_loaded = Gauge(
                "llmrelay_config_loaded_timestamp_seconds", "When this worker loaded the config it serves (unix time)",
                registry=self.registry, multiprocess_mode="liveall",
            )
            self._config_info = Gauge(
                "llmrelay_config_info", "1 for the config this worker serves, by the first 12 hex digits of the "
                "SHA-256 of its text", ["sha256"], registry=self.registry, multiprocess_mode="liveall",
            )
        self._config_loaded.set(loaded_at)
        self._config_info.labels(sha256).set(1)  # type: ignore[union-attr]

    def observe(self, call: Call) -> None:
        """Record one finished request (applied to the collectors at the next flush)."""
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
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.requests += 1
        total = call.elapsed()
        series.latency.add(total)
        if call.ttft is not None:
            series.ttft.add(call.ttft)
        self._overhead.add(max(total - call.upstream_time, 0.0))
        usage = call.usage
        series.prompt_tokens += usage.prompt_tokens
        series.completion_tokens += usage.completion_tokens
        if call.cost:
            series.cost += call.cost
            customer = call.params.customer() or "none"
            if customer not in self._customers:
                if len(self._customers) >= MAX_CUSTOMER_LABELS:
                    customer = "other"
                else:
                    self._customers.add(customer)
            self._customer_cost[customer] = self._customer_cost.get(customer, 0.0) + call.cost
        if call.dispatched:
            self._queue_time.add(call.dispatched - call.started)

    def count(self, counter: Any) -> None:
        """Add 1 to a counter (a labelled child) at the next flush: a dict update on the request path
        instead of the counter's lock."""
        self._counts[counter] = self._counts.get(counter, 0) + 1

    def observe_chunk_gaps(self, provider: str, counts: list[int], total: float) -> None:
        """Add one stream's inter-chunk gaps, counted per CHUNK_GAP_BUCKETS bucket by the relay
        (`counts` has one more slot for +Inf)."""
        pending = self._chunk_gaps.get(provider)
        if pending is None:
            pending = self._chunk_gaps[provider] = _Buckets(CHUNK_GAP_BUCKETS)
        pending.merge(counts, total)

    def flush(self) -> None:
        """Apply what requests observed since the last flush to the collectors. render() does it
        first; Gateway runs it every FLUSH_INTERVAL, so that with several workers every worker's
        numbers reach the shared files within that time."""
        series, self._series = self._series, {}
        for (model, provider, status), s in series.items():  # labels() makes each child (at 0) on first use
            self.requests.labels(model, provider, str(status)).inc(s.requests)
            s.latency.apply(self.latency.labels(model, provider))
            s.ttft.apply(self.ttft.labels(model, provider))
            self.tokens.labels(model, provider, "prompt").inc(s.prompt_tokens)
            self.tokens.labels(model, provider, "completion").inc(s.completion_tokens)
            self.cost.labels(model, provider).inc(s.cost)
        customer_cost, self._customer_cost = self._customer_cost, {}
        for customer, cost in customer_cost.items():
            self.customer_cost.labels(customer).inc(cost)
        counts, self._counts = self._counts, {}
        for counter, n in counts.items():
            counter.inc(n)
        self._overhead.apply(self.overhead)
        self._queue_time.apply(self.queue_time)
        for provider, gaps in self._chunk_gaps.items():
            gaps.apply(self.chunk_gap.labels(provider))
        self.in_flight.set(self.in_flight_now)
        for owner, sizes in self._sizes.items():
            for name, size in sizes().items():
                self.internal_entries.labels(f"{owner}.{name}").set(size)

    async def run_flusher(self) -> None:
        """flush() every FLUSH_INTERVAL seconds until cancelled (and once more then)."""
        try:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()

    def render(self) -> tuple[bytes, str]:
        self.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            registry.register(_WorkerFiles(multiprocess_dir() or ""))
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _WorkerFiles:
    """prometheus-client's MultiProcessCollector, minus the files a worker that is starting has
    created but not sized yet: read in that instant, an empty file failed the whole scrape (a 500
    from /metrics while granian replaced the workers on a reload)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Any:
        files = []
        for name in glob.glob(os.path.join(self.path, "*.db")):
            try:
                if os.path.getsize(name) >= 8:  # the header: how much of the file is used
                    files.append(name)
            except FileNotFoundError:  # a stopped worker's live gauges, removed meanwhile
                continue
        return prom_multiprocess.MultiProcessCollector.merge(files, accumulate=True)


class _Buckets:
    """Histogram observations not yet applied: a count per bucket (the last one +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the bucket observe() would pick: value <= bound
        self.total += value

    def merge(self, counts: list[int], total: float) -> None:
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.total += total

    def apply(self, child: Any) -> None:
        """Add the counts to a prometheus_client Histogram child and start over. There is no
        public bulk observe: this writes the child's bucket and sum values as observe() does."""
        if not any(self.counts):
            return
        for i, n in enumerate(self.counts):
            if n:
                child._buckets[i].inc(n)
                self.counts[i] = 0
        child._sum.inc(self.total)
        self.total = 0.0


class _Series:
    """One (model, provider, status) series' observations since the last flush."""

    __slots__ = ("requests", "latency", "ttft", "prompt_tokens", "completion_tokens", "cost")

    def __init__(self) -> None:
        self.requests = 0
        self.latency = _Buckets(LATENCY_BUCKETS)
        self.ttft = _Buckets(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cost = 0.0


def mark_worker_dead(pid: int) -> None:
    """Drop a stopped worker's live gauges from the multiprocess files."""
    if multiprocess_dir():
        prom_multiprocess.mark_process_dead(pid)
