"""Faults below HTTP: a TCP reset before the headers, no answer at all (the read timeout), a first byte after a
long delay (within and beyond the timeouts), and garbage instead of HTTP."""

from __future__ import annotations

import time

from tests.conftest import metric
from tests.faults.conftest import post, stream, unique
from tests.faults.fault_upstream import ok, reply, words_events
from tests.faults.fault_upstream import stream as sse


def attempts(record: dict) -> list[tuple[str, int]]:
    return [(a["provider"], a["status"]) for a in record["attempts"] or []]


def test_tcp_reset_before_headers_is_retried_then_a_502(gw, fault):
    model, good = unique("rst"), unique("good")
    fault.script(model, [("reset",)], ok(model, "after reset"))
    before = metric(gw.url, "llmrelay_retries_total", reason="connection")
    response = post(gw, f"fault-a/{model}", retry_params={"num_retries": 1, "retry_after": 0.01})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "after reset"
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts(record) == [("fault-a", 502), ("fault-a", 200)]
    assert record["attempts"][0]["error"]
    assert metric(gw.url, "llmrelay_retries_total", reason="connection") - before == 1

    fault.default(model, lambda n: [("reset",)])
    response = post(gw, f"fault-a/{model}", retries=0)
    assert response.status_code == 502
    detail = response.json()["detail"]
    assert "fault-a" in detail
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502 and record["status"] == "error" and record["error_message"] == detail

    fault.default(good, lambda n: ok(good))
    before = metric(gw.url, "llmrelay_fallbacks_total", reason="connection")
    response = post(gw, f"fault-a/{model}", fallback_models=[f"fault-b/{good}"], retries=0)
    assert response.status_code == 200 and response.headers["x-llmrelay-provider"] == "fault-b"
    assert metric(gw.url, "llmrelay_fallbacks_total", reason="connection") - before == 1


def test_no_answer_at_all_the_read_timeout_fires(gw, fault):
    model = unique("mute")
    fault.default(model, lambda n: [("hang",)])
    before = metric(gw.url, "llmrelay_retries_total", reason="timeout")
    started = time.monotonic()
    response = post(gw, f"fault-a/{model}", retry_params={"num_retries": 1, "retry_after": 0.01})
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert "fault-a" in response.json()["detail"]
    assert 1.5 <= elapsed < 10  # two tries of the 1 s read timeout
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 504 and record["error_message"] == response.json()["detail"]
    assert attempts(record) == [("fault-a", 504), ("fault-a", 504)]
    assert metric(gw.url, "llmrelay_retries_total", reason="timeout") - before == 1
    # the gateway hung up on both connections it gave up on
    deadline = time.monotonic() + 5
    while len(fault.closed(model)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(fault.closed(model)) == 2


def test_first_byte_after_a_delay_within_the_timeout_is_served(gw, fault):
    model = unique("late-ok")
    fault.script(model, reply(200, {"id": "x", "object": "chat.completion", "created": 1, "model": model,
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"},
                                                 "finish_reason": "stop"}],
                                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
                              delay=0.5),
                 sse(words_events(model, ["slow", " start"]), first_delay=0.3))
    response = post(gw, f"fault-a/{model}", retries=0)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "late"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["latency"] >= 0.45 and record["attempts"] is None
    response, body = stream(gw, f"fault-a/{model}", retries=0)
    assert response.status_code == 200 and body.endswith(b"data: [DONE]\n\n")
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["time_to_first_token"] >= 0.25
    assert record["completion_message"]["content"] == "slow start"
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="200") >= 2


def test_first_byte_beyond_the_timeout_falls_back_before_the_client_sees_anything(gw, fault):
    slow, good = unique("late"), unique("good")
    fault.default(slow, lambda n: sse(words_events(slow, ["never"]), first_delay=3))
    fault.default(good, lambda n: sse(words_events(good, ["fast"])))
    before = metric(gw.url, "llmrelay_fallbacks_total", reason="stream")
    response, body = stream(gw, f"fault-a/{slow}", fallback_models=[f"fault-b/{good}"], retries=0)
    assert response.status_code == 200 and response.headers["x-llmrelay-provider"] == "fault-b"
    assert b"never" not in body and b'"error"' not in body and body.endswith(b"data: [DONE]\n\n")
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts(record) == [("fault-a", 502), ("fault-b", 200)]
    assert "stalled" in record["attempts"][0]["error"]
    assert metric(gw.url, "llmrelay_fallbacks_total", reason="stream") - before == 1

    # a whole answer whose headers come after the read timeout: 504, then the fallback
    fault.default(slow, lambda n: reply(200, {}, delay=3))
    fault.default(good, lambda n: ok(good))
    before = metric(gw.url, "llmrelay_fallbacks_total", reason="timeout")
    response = post(gw, f"fault-a/{slow}", fallback_models=[f"fault-b/{good}"], retries=0)
    assert response.status_code == 200 and response.headers["x-llmrelay-provider"] == "fault-b"
    record = gw.record(response.headers["x-respan-log-id"])
    assert attempts(record) == [("fault-a", 504), ("fault-b", 200)]
    assert metric(gw.url, "llmrelay_fallbacks_total", reason="timeout") - before == 1


def test_garbage_instead_of_http_is_a_502_never_a_crash(gw, fault):
    model = unique("junk")
    fault.script(model, [("send", b"\x00\xffNOT HTTP AT ALL\r\n\r\n"), ("close",)],
                 [("send", b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                           b"\r\nzz\r\ngarbage"), ("close",)],
                 [("send", b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot json!"), ("close",)])
    before = metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="502")
    response = post(gw, f"fault-a/{model}", retries=0)
    assert response.status_code == 502 and "invalid HTTP answer" in response.json()["detail"]
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502 and record["error_message"] == response.json()["detail"]
    response, body = stream(gw, f"fault-a/{model}", retries=0)  # a broken chunk before the first event
    assert response.status_code == 502 and b"invalid HTTP answer" in body
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502 and "broke the stream" in record["error_message"]
    assert metric(gw.url, "llmrelay_requests_total", provider="fault-a", status="502") - before == 2
    # valid HTTP whose 200 body is not JSON: relayed unchanged (the gateway is a proxy), logged without usage
    response = post(gw, f"fault-a/{model}", retries=0)
    assert response.status_code == 200 and response.content == b"not json!"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["prompt_tokens"] == 0 and record["completion_tokens"] == 0
    assert "the provider's answer is not a JSON object (passed through unchanged; no usage read)" in record["warnings"]
