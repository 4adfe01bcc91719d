"""/metrics: exact counts after a known set of requests, multiprocess mode with two workers,
the overhead header, and secrets kept out of metrics and logs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from proxy.logs.sinks.sqlite import read_records
from proxy.metrics import FLUSH_INTERVAL, Metrics
from tests.conftest import KEY, UPSTREAM_KEY, GatewayProcess, wait_until

AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
GPT_TEST_COST = (9 * 1.0 + 2 * 0.5 + 7 * 2.0) / 1e6


class Scrape:
    """One /metrics scrape, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def type_of(self, family: str) -> str:
        assert family in self.families, f"{family} missing from /metrics"
        return self.families[family].type

    def get(self, sample: str, **labels: str) -> float:
        """Sum of the samples named `sample` whose labels include `labels`."""
        return sum(s.value for s in self.samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    def has(self, sample: str) -> bool:
        return any(s.name == sample for s in self.samples)


def scrape(gw: GatewayProcess) -> Scrape:
    # a fresh connection each time, so that with several workers any of them may answer
    response = httpx.get(f"{gw.url}/metrics", headers={"connection": "close"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def chat(gw: GatewayProcess, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{gw.url}/api/chat/completions", json=body, headers=AUTH if headers is None else headers,
                      timeout=10)


def wait_written(gw: GatewayProcess, n: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if scrape(gw).get("llmrelay_log_records_written_total", sink="sqlite") >= n:
            return
        time.sleep(0.05)


def test_metrics_exact_counts(start_gateway, mock):
    gw = start_gateway()
    before = scrape(gw)
    for name in ("llmrelay_in_flight_requests", "llmrelay_log_queue_depth",
                 "llmrelay_log_records_spilled_total", "llmrelay_gateway_overhead_seconds_count"):
        assert before.has(name), name
    assert before.get("llmrelay_requests_total") == 0

    client = OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0)
    responses = []
    for _ in range(3):
        responses.append(client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES))
    with client.chat.completions.with_streaming_response.create(model="gpt-test", messages=MESSAGES, stream=True) as s:
        assert "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices)
        responses.append(s)
    responses.append(chat(gw, {"model": "mock/mock-status-500", "messages": MESSAGES}))
    responses.append(chat(gw, {"model": "no-such-model", "messages": MESSAGES}))
    responses.append(chat(gw, {"model": "gpt-test", "messages": MESSAGES}, headers={"Authorization": "Bearer nope"}))
    assert [r.status_code for r in responses[-3:]] == [500, 404, 401]
    for r in responses:  # every response carries the gateway's overhead
        assert float(r.headers["x-llmrelay-overhead-ms"]) >= 0

    wait_written(gw, 7)
    m = scrape(gw)

    # requests by model, provider and status
    assert m.type_of("llmrelay_requests") == "counter"
    assert m.get("llmrelay_requests_total") == 7
    assert m.get("llmrelay_requests_total", model="mock-ok", provider="mock", status="200") == 4
    assert m.get("llmrelay_requests_total", provider="mock", status="500") == 1
    assert m.get("llmrelay_requests_total", status="404") == 1
    assert m.get("llmrelay_requests_total", status="401") == 1
    assert m.get("llmrelay_requests_total", model="none", provider="none") == 2  # 404 and 401: never routed

    # latency histogram
    assert m.type_of("llmrelay_request_latency_seconds") == "histogram"
    ok = {"model": "mock-ok", "provider": "mock"}
    assert m.get("llmrelay_request_latency_seconds_count", **ok) == 4
    assert m.get("llmrelay_request_latency_seconds_bucket", le="+Inf", **ok) == 4
    assert m.get("llmrelay_request_latency_seconds_count") == 7
    assert 0 < m.get("llmrelay_request_latency_seconds_sum", **ok) < 10

    # TTFT: the one stream
    assert m.type_of("llmrelay_time_to_first_token_seconds") == "histogram"
    assert m.get("llmrelay_time_to_first_token_seconds_count", **ok) == 1
    assert m.get("llmrelay_time_to_first_token_seconds_count") == 1
    assert 0 < m.get("llmrelay_time_to_first_token_seconds_sum") <= m.get("llmrelay_request_latency_seconds_sum", **ok)

    # overhead: total minus upstream time, for every request
    assert m.type_of("llmrelay_gateway_overhead_seconds") == "histogram"
    assert m.get("llmrelay_gateway_overhead_seconds_count") == 7
    assert 0 < m.get("llmrelay_gateway_overhead_seconds_sum") < m.get("llmrelay_request_latency_seconds_sum")

    # tokens and cost (mock usage 11/7 per request; the 500 has none)
    assert m.get("llmrelay_tokens_total", kind="prompt", **ok) == 44
    assert m.get("llmrelay_tokens_total", kind="completion", **ok) == 28
    assert m.get("llmrelay_tokens_total") == 72
    assert m.get("llmrelay_cost_usd_total", **ok) == pytest.approx(4 * GPT_TEST_COST, rel=1e-6)

    # gauges and the log pipeline
    assert m.type_of("llmrelay_in_flight_requests") == "gauge"
    assert m.get("llmrelay_in_flight_requests") == 0
    assert m.type_of("llmrelay_log_queue_depth") == "gauge"
    assert m.get("llmrelay_log_queue_depth") == 0
    assert m.get("llmrelay_log_records_written_total", sink="sqlite") == 7
    assert m.get("llmrelay_log_records_written_total", sink="jsonl") == 7
    assert m.get("llmrelay_log_records_spilled_total") == 0
    assert m.get("llmrelay_log_records_replayed_total") == 0

    # scraping is not a request
    assert scrape(gw).get("llmrelay_requests_total") == 7


def test_unrouted_requests_do_not_add_label_values(start_gateway, mock):
    """Without a key, a client must not be able to grow /metrics with made-up model names."""
    gw = start_gateway()
    for i in range(15):
        assert chat(gw, {"model": f"made-up-{i}", "messages": MESSAGES}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert chat(gw, {"model": f"unknown-{i}", "messages": MESSAGES}).status_code == 404
    m = scrape(gw)
    assert m.get("llmrelay_requests_total") == 30
    series = {tuple(sorted(s.labels.items())) for s in m.samples if s.name == "llmrelay_requests_total"}
    assert series == {(("model", "none"), ("provider", "none"), ("status", "401")),
                      (("model", "none"), ("provider", "none"), ("status", "404"))}
    assert "made-up" not in m.text and "unknown-" not in m.text


def test_in_flight_counts_an_open_stream(start_gateway, mock):
    gw = start_gateway()
    with httpx.Client(timeout=10) as http, http.stream(
        "POST", f"{gw.url}/api/chat/completions", headers=AUTH,
        json={"model": "mock/mock-slow", "messages": MESSAGES, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert float(response.headers["x-llmrelay-overhead-ms"]) >= 0
        lines = response.iter_lines()  # kept referenced: dropping it would close the connection
        while '"content"' not in next(lines):
            pass
        assert scrape(gw).get("llmrelay_in_flight_requests") == 1
        assert scrape(gw).get("llmrelay_requests_total") == 0  # counted when it ends
    assert mock.wait_for_closed_stream() is not None
    deadline = time.monotonic() + 5
    while scrape(gw).get("llmrelay_requests_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    m = scrape(gw)
    assert m.get("llmrelay_in_flight_requests") == 0
    assert m.get("llmrelay_requests_total", model="mock-slow", provider="mock", status="499") == 1
    assert m.get("llmrelay_time_to_first_token_seconds_count", model="mock-slow") == 1


def test_two_workers_share_their_counts(start_gateway, mock):
    gw = start_gateway(workers=2)

    def one(i: int) -> int:
        # a new connection per request, so that both workers get some
        return chat(gw, {"model": "gpt-test", "messages": MESSAGES}, headers={**AUTH, "connection": "close"}).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(20))) == [200] * 20

    deadline = time.monotonic() + 15  # generous: the log writers of both workers, on a loaded machine
    while scrape(gw).get("llmrelay_log_records_written_total") < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    # each worker applies its request metrics to the shared files every FLUSH_INTERVAL (0.5 s): a
    # scrape shows all 20 once both have (the sum over both files), less until then
    def flushed() -> bool:
        m = scrape(gw)
        return all(m.get(name) == 20 for name in ("llmrelay_requests_total", "llmrelay_request_latency_seconds_count",
                                                   "llmrelay_gateway_overhead_seconds_count"))

    assert wait_until(flushed, 5)
    for _ in range(8):  # whichever worker answers, it reports the sum over both
        m = scrape(gw)
        assert m.get("llmrelay_requests_total") == 20
        assert m.get("llmrelay_requests_total", model="mock-ok", provider="mock", status="200") == 20
        assert m.get("llmrelay_request_latency_seconds_count") == 20
        assert m.get("llmrelay_gateway_overhead_seconds_count") == 20
        assert m.get("llmrelay_tokens_total", kind="prompt") == 220
        assert m.get("llmrelay_cost_usd_total") == pytest.approx(20 * GPT_TEST_COST, rel=1e-6)
        assert m.get("llmrelay_in_flight_requests") == 0
        assert m.get("llmrelay_log_records_written_total", sink="sqlite") == 20
        assert m.has("llmrelay_log_queue_depth") and m.has("llmrelay_log_records_spilled_total")
    assert len(read_records(gw.log_db)) == 20


def test_upstream_key_never_in_metrics_or_logs(gateway, mock):
    client = OpenAI(base_url=f"{gateway.url}/api", api_key=KEY, max_retries=0)
    ids = [client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES).headers["x-respan-log-id"]]
    with client.chat.completions.with_streaming_response.create(model="gpt-test", messages=MESSAGES, stream=True) as s:
        ids.append(s.headers["x-respan-log-id"])
        list(s.parse())
    for body in ({"model": "mock/mock-status-401", "messages": MESSAGES},  # the provider rejects "our" key
                 {"model": "mock/mock-cut-3", "messages": MESSAGES, "stream": True},
                 {"model": "down-model", "messages": MESSAGES}):
        response = chat(gateway, body)
        assert UPSTREAM_KEY not in response.text
        ids.append(response.headers["x-respan-log-id"])
    # the key was in use: the provider got it
    assert mock.requests[0]["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"

    marks = ",".join("?" * len(ids))
    rows = gateway.records(count=len(ids), where=f"unique_id IN ({marks})", args=tuple(ids))
    assert len(rows) == len(ids)
    time.sleep(0.1)
    assert UPSTREAM_KEY not in scrape(gateway).text
    for row in read_records(gateway.log_db):
        assert UPSTREAM_KEY not in repr(row)
    assert UPSTREAM_KEY not in (gateway.workdir / "logs.jsonl").read_text()
    for path in gateway.workdir.rglob("*"):
        if path.is_file() and path != gateway.config_path:  # the config holds it, of course
            assert UPSTREAM_KEY.encode() not in path.read_bytes(), path


def test_model_label_values_are_capped():
    """Each label value stays in the registry for good, so new model names past the cap count as 'other'."""
    from proxy.call import Call, Target
    from proxy.metrics import MAX_MODEL_LABELS, Metrics
    from proxy.params import EMPTY

    metrics = Metrics()
    target = Target(provider="mock", protocol="openai", model="m")
    for i in range(MAX_MODEL_LABELS + 50):
        call = Call(endpoint="chat", path="/", body={"model": f"mock/random-{i}"}, params=EMPTY, headers={})
        call.target, call.status_code = target, 404
        metrics.observe(call)
    metrics.flush()  # observations reach the collectors in batches
    families = {s.labels["model"] for m in metrics.registry.collect() if m.name == "llmrelay_requests"
                for s in m.samples if s.name == "llmrelay_requests_total"}
    assert len(families) == MAX_MODEL_LABELS + 1
    assert metrics.registry.get_sample_value(
        "llmrelay_requests_total", {"model": "other", "provider": "mock", "status": "404"}) == 50


def test_chunk_gaps_queue_time_and_customer_spend(start_gateway, mock):
    """Inter-chunk latency (one observation per gap, bulk-added at the stream's end), the time to
    the first upstream attempt, and spend per customer."""
    gw = start_gateway()
    client = OpenAI(base_url=f"{gw.url}/api", api_key=KEY, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
            model="mock/mock-slow-5", messages=MESSAGES, stream=True) as s:
        chunks = [c for c in s.parse() if c.choices and c.choices[0].delta.content]
    assert len(chunks) == 5
    for customer in ("acme", "acme", "globex"):
        client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_body={"customer_identifier": customer})
    client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    m = scrape(gw)
    assert m.type_of("llmrelay_stream_chunk_gap_seconds") == "histogram"
    gaps = m.get("llmrelay_stream_chunk_gap_seconds_count", provider="mock")
    assert gaps >= 4  # 5 content chunks, one every 50 ms, then the closing ones
    assert m.get("llmrelay_stream_chunk_gap_seconds_bucket", provider="mock", le="0.025") < gaps  # the 50 ms gaps
    assert m.get("llmrelay_stream_chunk_gap_seconds_bucket", provider="mock", le="+Inf") == gaps
    assert 0.2 <= m.get("llmrelay_stream_chunk_gap_seconds_sum", provider="mock") < 5
    assert m.get("llmrelay_queue_time_seconds_count") == 5  # every request that reached an upstream
    assert m.get("llmrelay_customer_cost_usd_total", customer="acme") == pytest.approx(2 * GPT_TEST_COST, rel=1e-6)
    assert m.get("llmrelay_customer_cost_usd_total", customer="globex") == pytest.approx(GPT_TEST_COST, rel=1e-6)
    assert m.get("llmrelay_customer_cost_usd_total", customer="none") == pytest.approx(GPT_TEST_COST, rel=1e-6)


def test_customer_label_values_are_capped():
    from proxy.call import Call, Target
    from proxy.metrics import MAX_CUSTOMER_LABELS, Metrics
    from proxy.params import split_params

    metrics = Metrics()
    target = Target(provider="p", protocol="openai", model="m")
    for i in range(MAX_CUSTOMER_LABELS + 50):
        call = Call(endpoint="chat", path="/", body={}, params=split_params({"customer_identifier": f"c{i}"}, None, None),
                    headers={})
        call.target, call.cost, call.status_code = target, 1.0, 200
        metrics.observe(call)
    values = {s.labels["customer"]: s.value for s in Scrape(generate(metrics)).samples
              if s.name == "llmrelay_customer_cost_usd_total"}
    assert len(values) == MAX_CUSTOMER_LABELS + 1 and values["other"] == 50


def generate(metrics) -> str:
    return metrics.render()[0].decode()


def test_internal_map_sizes_are_exposed_and_bounded(start_gateway, mock):
    """llmrelay_internal_entries: what each in-memory map holds, so a soak can show none grows."""
    policy = {"name": "per-customer", "scope": "customer", "metric": "requests", "window": "day",
              "block_threshold": 1000}
    gw = start_gateway(pipeline=["auth", {"name": "limits", "options": {"policies": [policy]}},
                                 {"name": "cache", "options": {"defaults": {"cache_enabled": True}}}])
    for i in range(5):
        body = {"model": "gpt-test", "messages": [{"role": "user", "content": f"entry {i}"}],
                "customer_params": {"customer_identifier": f"c{i}", "total_budget": 100}}
        assert chat(gw, body).status_code == 200
    assert chat(gw, {"model": "gpt-test", "messages": [{"role": "user", "content": "entry 0"}],
                     "customer_params": {"customer_identifier": "c0"}}).headers["x-llmrelay-cache"] == "hit"
    time.sleep(FLUSH_INTERVAL * 2)
    sizes = {s.labels["map"]: s.value for s in scrape(gw).samples if s.name == "llmrelay_internal_entries"}
    assert sizes["cache.entries"] == 5
    assert sizes["limits.customers"] == 5  # budgets from customer_params, remembered (bounded)
    assert sizes["upstream.idle_connections"] == 1  # one kept-alive connection to the mock, reused
    assert sizes["models.resolved"] == 1
    assert sizes["cooldowns.cooling"] == 0
    assert sizes["metrics.model_labels"] == 2  # gpt-test, and respan/cache for the hit
    assert {"upstream.request_heads", "redis.clients", "limits.alerted", "cache.pending_stores"} <= set(sizes)


def test_counts_reach_the_counters_at_the_flush():
    """Per-request counts from the stages (Metrics.count) are tallied, then applied by flush(), which every
    scrape runs first."""
    metrics = Metrics()
    hit = metrics.cache_lookups.labels("hit")
    for _ in range(3):
        metrics.count(hit)
    metrics.count(metrics.cache_stores)
    assert metrics.registry.get_sample_value("llmrelay_cache_lookups_total", {"result": "hit"}) == 0
    assert b'llmrelay_cache_lookups_total{result="hit"} 3.0' in metrics.render()[0]
    assert metrics.registry.get_sample_value("llmrelay_cache_stores_total") == 1
    metrics.flush()  # applied once, not again
    assert metrics.registry.get_sample_value("llmrelay_cache_lookups_total", {"result": "hit"}) == 3
