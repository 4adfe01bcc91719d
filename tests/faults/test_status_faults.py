"""Upstream error statuses: 429 with and without Retry-After, 500 once, persistent 503, context length,
content filter, and who is billed after a fallback. Each checks the client outcome, the log record and /metrics."""

from __future__ import annotations

import time

import pytest

from tests.conftest import metric
from tests.faults.conftest import PRICES_A, PRICES_B, post, sse_events, stream, unique
from tests.faults.fault_upstream import completion, fail, ok, reply, words_events
from tests.faults.fault_upstream import stream as sse


def attempts(record: dict) -> list[tuple[str, int]]:
    return [(a["provider"], a["status"]) for a in record["attempts"] or []]


def test_429_with_retry_after_is_honoured_and_capped(start_fault_gateway, fault):
    gw = start_fault_gateway(pipeline=["auth", "routing", "credentials",
                                       {"name": "fallback", "options": {"max_retry_after": 0.6}}])
    model = unique("ra")
    fault.script(model, fail(429, headers={"retry-after": "0.4"}), fail(429, headers={"retry-after": "30"}))
    fault.default(model, lambda n: ok(model))
    before = metric(gw.url, "llmrelay_retries_total", reason="429")
    started = time.monotonic()
    response = post(gw, f"fault-a/{model}", retry_params={"num_retries": 3, "retry_after": 0.01})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.headers["x-llmrelay-attempts"] == "3"
    times = [r["time"] for r in fault.requests(model)]
    assert times[1] - times[0] >= 0.35  # Retry-After 0.4 s honoured, not the 0.01 s back-off
    assert 0.45 <= times[2] - times[1] < 5  # Retry-After 30 s capped by max_retry_after (0.6 s, minus jitter)
    assert elapsed < 10
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["status"] == "success"
    assert attempts(record) == [("fault-a", 429), ("fault-a", 429), ("fault-a", 200)]
    assert record["fallback"] is False
    assert metric(gw.url, "llmrelay_retries_total", reason="429") - before == 2
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="200") >= 1


def test_429_without_retry_after_backs_off_then_the_client_gets_the_429(gw, fault):
    model = unique("r429")
    fault.default(model, lambda n: fail(429, "slow down", headers={"x-request-id": f"req-{n}"}))
    before = metric(gw.url, "llmrelay_retries_total", reason="429")
    response = post(gw, f"fault-a/{model}", retry_params={"num_retries": 2, "retry_after": 0.1})
    assert response.status_code == 429
    assert response.json()["error"]["message"] == "slow down"
    assert response.headers["x-request-id"] == "req-2"  # the last try's own headers
    times = [r["time"] for r in fault.requests(model)]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.07 and times[2] - times[1] >= 0.14  # 0.1 * 2**n, +-25 %
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 429 and record["status"] == "error"
    assert "slow down" in record["error_message"]
    assert attempts(record) == [("fault-a", 429)] * 3
    assert metric(gw.url, "llmrelay_retries_total", reason="429") - before == 2


def test_500_once_then_success_is_one_record_with_both_attempts(gw, fault):
    model = unique("once")
    fault.script(model, fail(500, "transient"), ok(model, "recovered"))
    before = metric(gw.url, "llmrelay_retries_total", reason="500")
    response = post(gw, f"fault-a/{model}", retry_params={"num_retries": 2, "retry_after": 0.01})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "recovered"
    log_id = response.headers["x-respan-log-id"]
    record = gw.record(log_id)
    assert attempts(record) == [("fault-a", 500), ("fault-a", 200)]
    assert "transient" in record["attempts"][0]["error"]
    assert record["prompt_tokens"] == 12 and record["completion_tokens"] == 5
    time.sleep(0.2)
    assert len(gw.records(where="unique_id = ?", args=(log_id,))) == 1
    assert metric(gw.url, "llmrelay_retries_total", reason="500") - before == 1
    assert metric(gw.url, "llmrelay_attempts_total", provider="fault-a", outcome="failure") >= 1


def test_persistent_503_falls_back_then_all_failing_gives_the_last_error(gw, fault):
    bad, good = unique("s503"), unique("good")
    fault.default(bad, lambda n: fail(503, "overloaded"))
    fault.default(good, lambda n: ok(good))
    before = metric(gw.url, "llmrelay_fallbacks_total", reason="503")
    response = post(gw, f"fault-a/{bad}", fallback_models=[f"fault-b/{good}"],
                    retry_params={"num_retries": 1, "retry_after": 0.01})
    assert response.status_code == 200
    assert response.headers["x-llmrelay-provider"] == "fault-b"
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts(record) == [("fault-a", 503), ("fault-a", 503), ("fault-b", 200)]
    assert record["fallback"] is True and record["provider_id"] == "fault-b"
    assert metric(gw.url, "llmrelay_fallbacks_total", reason="503") - before == 1

    other = unique("s502")
    fault.default(other, lambda n: fail(502, "bad gateway upstream"))
    response = post(gw, f"fault-a/{bad}", fallback_models=[f"fault-b/{other}"], retries=0)
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "bad gateway upstream"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502 and record["status"] == "error"
    assert attempts(record) == [("fault-a", 503), ("fault-b", 502)]
    assert record["error_message"] and "bad gateway upstream" in record["error_message"]
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-b", status="502") >= 1


CONTEXT = {"error": {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error",
                     "param": "messages", "code": "context_length_exceeded"}}


def test_context_length_exceeded_passes_through_and_falls_back_when_configured(start_fault_gateway, fault):
    small, large = unique("small"), unique("large")
    fault.default(small, lambda n: reply(400, CONTEXT))
    fault.default(large, lambda n: ok(large, "fits"))
    plain = start_fault_gateway()
    response = post(plain, f"fault-a/{small}", fallback_models=[f"fault-b/{large}"])
    assert response.status_code == 400
    assert response.json() == CONTEXT
    assert fault.count(large) == 0 and fault.count(small) == 1
    record = plain.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 400 and "maximum context length" in record["error_message"]
    assert metric(plain.url, "llmrelay_requests_total", provider="fault-a", status="400") == 1

    configured = start_fault_gateway(pipeline=["auth", "routing", "credentials",
                                               {"name": "fallback", "options": {"fallback_on_context_length": True}}])
    response = post(configured, f"fault-a/{small}", fallback_models=[f"fault-b/{large}"])
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "fits"
    assert fault.count(small) == 2  # never retried on the small one
    record = configured.record(response.headers["x-respan-log-id"])
    assert attempts(record) == [("fault-a", 400), ("fault-b", 200)]
    assert metric(configured.url, "llmrelay_fallbacks_total", reason="400") == 1


def test_content_filter_refusal_passes_through_and_is_logged(gw, fault):
    model = unique("filter")
    fault.script(model, ok(model, "", finish="content_filter"),
                 sse(words_events(model, ["I", " cannot"], finish="content_filter")))
    response = post(gw, f"fault-a/{model}")
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "content_filter"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["status"] == "success"
    assert record["completion_message"] is not None
    response, body = stream(gw, f"fault-a/{model}")
    finishes = [e for e in sse_events(body) if b'"finish_reason":"content_filter"' in e]
    assert len(finishes) == 1 and body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["completion_message"]["content"] == "I cannot"
    assert fault.count(model) == 2  # a refusal is an answer: never retried or fallen back
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="200") >= 2


def test_usage_and_cost_after_a_fallback_are_billed_to_the_deployment_that_answered(gw, fault):
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    fault.default("priced-a", lambda n: fail(503))
    fault.default("priced-b", lambda n: reply(200, completion("priced-b", "b", usage=usage)))
    cost_before = metric(gw.url, "llmrelay_cost_usd_total")
    tokens_before = metric(gw.url, "llmrelay_tokens_total", kind="completion")
    response = post(gw, "priced-a", fallback_models=["priced-b"], retries=0)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 500
    expected = (1000 * PRICES_B["input"] + 500 * PRICES_B["output"]) / 1e6
    assert expected != (1000 * PRICES_A["input"] + 500 * PRICES_A["output"]) / 1e6
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["provider_id"] == "fault-b" and record["model"] == "priced-b"
    assert record["model_requested"] == "priced-a"
    assert record["prompt_tokens"] == 1000 and record["completion_tokens"] == 500
    assert record["cost"] == pytest.approx(expected)
    assert metric(gw.url, "llmrelay_cost_usd_total") - cost_before == pytest.approx(expected)
    assert metric(gw.url, "llmrelay_tokens_total", kind="completion") - tokens_before == 500
