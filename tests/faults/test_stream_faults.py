"""Faults in the middle of a stream: cut after N chunks, a stall (stream_idle fires), a malformed chunk, no
[DONE], and a client that leaves mid-stream (upstream closed at once, 499 logged, limit counters reconciled)."""

from __future__ import annotations

import contextlib
import os
import time

import httpx
import openai
import orjson
import pytest
import redis

from tests.conftest import ADMIN_KEY, ADMIN_KEYS, REDIS_URL, metric, openai_client
from tests.faults.conftest import AUTH, HI, sse_events, stream, unique
from tests.faults.fault_upstream import chunk_event, fail, http_chunk, words_events
from tests.faults.fault_upstream import stream as sse

WORDS = [" one", " two", " three", " four", " five", " six"]


def content(body: bytes) -> str:
    text = ""
    for event in sse_events(body):
        if event.startswith(b"{") and b'"choices":[{' in event:
            with contextlib.suppress(orjson.JSONDecodeError):
                text += orjson.loads(event)["choices"][0]["delta"].get("content") or ""
    return text


def test_stream_cut_after_n_chunks_ends_with_an_error_event_and_partial_usage(gw, fault):
    model = unique("cut")
    fault.default(model, lambda n: sse(words_events(model, WORDS), cut_after=4))  # role + 3 words, then a RST
    before = metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="502")
    response, body = stream(gw, f"fault-a/{model}", retries=0)
    assert response.status_code == 200  # the headers went out with the first chunk
    events = sse_events(body)
    assert content(body) == " one two three"
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == 502 and "broke the stream" in error["message"]
    assert events[-1] == b"[DONE]"  # the terminator comes only after the error event, never clean
    assert not any(b'"finish_reason":"stop"' in e for e in events)
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502 and record["status"] == "error"
    assert record["error_message"] == error["message"]
    assert record["completion_tokens"] == 3 and record["prompt_tokens"] > 0  # partial usage, estimated
    assert any("usage estimated" in w for w in record["warnings"])
    assert record["completion_message"]["content"] == " one two three"
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="502") - before == 1
    # the official SDK raises on the error event instead of ending quietly
    with pytest.raises(openai.APIError, match="broke the stream"):
        list(openai_client(gw).chat.completions.create(model=f"fault-a/{model}", messages=HI, stream=True))


def test_stall_mid_stream_fires_stream_idle_with_an_error_event(gw, fault):
    model = unique("stall")
    fault.default(model, lambda n: sse(words_events(model, WORDS), stall_after=3))
    started = time.monotonic()
    response, body = stream(gw, f"fault-a/{model}", retries=0)
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and content(body) == " one two"
    events = sse_events(body)
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == 502 and "stalled" in error["message"]
    assert events[-1] == b"[DONE]"
    assert 0.4 <= elapsed < 10  # stream_idle is 0.5 s
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502 and record["error_message"] == error["message"]
    assert record["completion_tokens"] == 2
    # the gateway let go of the stalled connection
    deadline = time.monotonic() + 5
    while not fault.closed(model) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(fault.closed(model)) == 1
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="502") >= 1


MALFORMED = b'data: {"id": "chatcmpl-fault", "choices": [{"delta": {"content": "broken\n\n'


def test_a_malformed_chunk_is_forwarded_and_the_stream_completes(gw, fault):
    model = unique("malformed")
    events = words_events(model, WORDS[:3], usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
    events.insert(2, MALFORMED)
    fault.default(model, lambda n: sse(events))
    before = metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="200")
    response, body = stream(gw, f"fault-a/{model}", retries=0, stream_options={"include_usage": True})
    assert response.status_code == 200
    assert MALFORMED in body  # unchanged
    assert content(body) == " one two three" and body.endswith(b"data: [DONE]\n\n")
    assert b'"error"' not in body
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["status"] == "success"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (9, 3)  # the provider's usage still counted
    assert "1 stream event(s) were not valid JSON (forwarded unchanged)" in record["warnings"]
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="200") - before == 1


def test_a_stream_without_done_is_completed_when_finished_and_an_error_when_not(gw, fault):
    model = unique("nodone")
    fault.script(model, sse(words_events(model, WORDS[:2]), done=False),        # finish_reason, no [DONE]
                 sse(words_events(model, WORDS[:2], finish=None), done=False))   # neither
    response, body = stream(gw, f"fault-a/{model}", retries=0)
    assert response.status_code == 200 and body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["status"] == "success"
    assert record["completion_message"]["content"] == " one two"

    before = metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="502")
    response, body = stream(gw, f"fault-a/{model}", retries=0)
    events = sse_events(body)
    assert orjson.loads(events[-2]) == {"error": {"message": "provider 'fault-a' ended the stream early",
                                                  "type": "upstream_error", "code": 502}}
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502 and record["error_message"] == "provider 'fault-a' ended the stream early"
    assert record["completion_tokens"] == 2
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="502") - before == 1


def test_client_disconnect_mid_stream_closes_upstream_logs_499_and_reconciles_limits(start_fault_gateway, fault):
    policy = f"faults-tokens-{os.urandom(4).hex()}"
    gw = start_fault_gateway(
        pipeline=["auth", {"name": "limits", "options": {"policies": [
            {"name": policy, "scope": "api_key", "metric": "tokens", "window": "lifetime",
             "block_threshold": 10_000_000}]}}, "routing", "credentials", "fallback"],
        state={"counters": {"backend": "redis", "url": REDIS_URL}}, admin_keys=ADMIN_KEYS)
    counter = redis.Redis.from_url(REDIS_URL)
    try:
        model = unique("leave")
        # 3 chunks, then silence kept alive by a slow trickle, so only the client's leaving ends it
        trickle = [("send", http_chunk(chunk_event(model, f" w{i}"))) for i in range(3)]
        for i in range(3, 200):
            trickle += [("sleep", 0.05), ("send", http_chunk(chunk_event(model, f" w{i}")))]
        fault.default(model, lambda n: [("send", sse([])[0][1]), *trickle, ("hang",)])
        read = 0
        with httpx.Client(timeout=10) as http, http.stream(
                "POST", f"{gw.url}/api/chat/completions", headers=AUTH,
                json={"model": f"fault-a/{model}", "messages": HI, "stream": True}) as response:
            log_id = response.headers["x-respan-log-id"]
            for line in response.iter_lines():
                if '"content"' in line:
                    read += 1
                    if read == 5:
                        break
        left = time.monotonic()
        deadline = left + 5
        while not fault.closed(model) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fault.closed(model), "the gateway kept the upstream stream open after the client left"
        assert fault.closed(model)[0] - left < 2
        record = gw.record(log_id)
        assert record["status_code"] == 499 and record["status"] == "error"
        assert record["error_message"].startswith("client disconnected")
        assert read <= record["completion_tokens"] < 60
        used = record["prompt_tokens"] + record["completion_tokens"]
        keys = list(counter.scan_iter(match=f"*{policy}*"))
        assert len(keys) == 1

        def value() -> float:
            return float(counter.get(keys[0]) or 0)

        deadline = time.monotonic() + 5
        while value() != used and time.monotonic() < deadline:
            time.sleep(0.02)
        assert value() == used  # the estimate reserved up front replaced by what was used
        usage = httpx.get(f"{gw.url}/api/limits/{policy}/usage/", params={"scope_id": "tests"},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        assert usage["value"] == used
        assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="499") == 1
        assert metric(gw.url, "llmrelay_in_flight_requests") == 0
    finally:
        for key in counter.scan_iter(match=f"*{policy}*"):
            counter.delete(key)


@pytest.mark.parametrize("stream_request", [False, True])
def test_client_gone_while_the_gateway_waits_is_a_499_and_the_upstream_is_closed_at_once(gw, fault, stream_request):
    """Regression: the client's leaving was watched only once a stream had started, so a client that gave up on a
    slow answer (whole, or a stream before its first byte) left the provider request open until the read timeout
    (600 s by default), then logged a 504."""
    model = unique("gone")
    fault.default(model, lambda n: [("hang",)])
    before = metric(gw.url, "llmrelay_requests_total", provider="fault-patient", status="499")
    with pytest.raises(httpx.ReadTimeout), httpx.stream(
            "POST", f"{gw.url}/api/chat/completions", headers=AUTH, timeout=0.5,
            json={"model": f"fault-patient/{model}", "messages": HI, "stream": stream_request}) as response:
        response.read()
    left = time.monotonic()
    deadline = left + 10
    while not fault.closed(model) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fault.closed(model) and fault.closed(model)[0] - left < 5  # not the 30 s read timeout
    record = gw.records(where="model_requested = ?", args=(f"fault-patient/{model}",))[0]
    assert record["status_code"] == 499 and record["error_message"] == "client disconnected before the answer"
    assert record["stream"] is stream_request
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-patient", status="499") - before == 1
    assert metric(gw.url, "llmrelay_in_flight_requests") == 0


def test_client_gone_during_a_retry_back_off_stops_the_retries(gw, fault):
    model = unique("backoff")
    # a 2 s back-off: the client (0.5 s timeout) leaves well inside it, and the wait below ends 1 s past it
    fault.default(model, lambda n: fail(429, "wait", headers={"retry-after": "2"}))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.url}/api/chat/completions", headers=AUTH, timeout=0.5,
                   json={"model": f"fault-patient/{model}", "messages": HI,
                         "retry_params": {"num_retries": 3, "retry_after": 0.1}})
    record = gw.records(where="model_requested = ?", args=(f"fault-patient/{model}",))[0]
    assert record["status_code"] == 499
    time.sleep(2.5)  # past the Retry-After: no retry went out for a client that is gone
    assert fault.count(model) == 1
