"""End to end: streamed chat completions through the gateway (SSE relay, usage tap, broken streams)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import KEY, add_tool_call_deltas
from tests.conftest import openai_client as client
from tests.mock_upstream import USAGE, WORDS, chunk

ANSWER = "".join(WORDS)
HI = [{"role": "user", "content": "hi"}]


def raw_stream(gateway, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    """POST a streaming request with httpx; the response and every byte of its body."""
    with httpx.stream(
        "POST", f"{gateway.url}/api/chat/completions",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        content=orjson.dumps({"stream": True, **body}), timeout=10,
    ) as response:
        data = b"".join(response.iter_raw())
    return response, data


def events(data: bytes) -> list[bytes]:
    """The data payloads of an SSE body, in order."""
    out = []
    for event in data.split(b"\n\n"):
        if not event:
            continue
        lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
        assert lines, f"an event without data: {event!r}"
        out.append(b"\n".join(line[5:].lstrip(b" ") for line in lines))
    return out


def expected_mock_stream(model: str, *, usage: bool, n: int = 1) -> bytes:
    """What the mock emits for a normal stream (see tests/mock_upstream.py)."""
    out = [chunk(model, {"role": "assistant", "content": ""})]
    for word in WORDS:
        out += [chunk(model, {"content": word}, index=i) for i in range(n)]
    out += [chunk(model, {}, "stop", index=i) for i in range(n)]
    if usage:
        out.append(chunk(model, None, usage=USAGE))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def test_stream_without_include_usage(gateway, mock):
    stream = client(gateway).chat.completions.with_raw_response.create(model="gpt-test", messages=HI, stream=True)
    chunks = list(stream.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is hidden
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == 1 + len(WORDS) + 1  # role, words, finish

    body = mock.last()["body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}  # asked on the client's behalf
    assert body["model"] == "mock-ok"

    record = gateway.record(stream.headers["x-respan-log-id"])
    assert record["stream"] is True
    assert record["status_code"] == 200
    assert record["status"] == "success"
    assert record["error_message"] == ""
    assert record["prompt_tokens"] == 11
    assert record["completion_tokens"] == 7
    assert record["prompt_cache_hit_tokens"] == 2
    assert record["cost"] == pytest.approx(24 / 1e6)
    assert record["time_to_first_token"] > 0
    assert record["time_to_first_token"] <= record["latency"]
    assert record["completion_message"] == {"role": "assistant", "content": ANSWER}
    assert record["model"] == "mock-ok"
    assert not record["warnings"]


def test_stream_keeps_other_stream_options(gateway, mock):
    chunks = list(client(gateway).chat.completions.create(
        model="gpt-test", messages=HI, stream=True, stream_options={"include_obfuscation": False},
    ))
    assert all(c.usage is None for c in chunks)
    assert mock.last()["body"]["stream_options"] == {"include_obfuscation": False, "include_usage": True}


def test_stream_with_include_usage(gateway, mock):
    stream = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert chunks[-1] is usage_chunks[0] and chunks[-1].choices == []
    usage = usage_chunks[0].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 7, 18)
    assert mock.last()["body"]["stream_options"] == {"include_usage": True}
    record = gateway.record(stream.headers["x-respan-log-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 7)


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_bytes_are_unchanged(gateway, mock, include_usage):
    body: dict[str, Any] = {"model": "gpt-test", "messages": HI}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response, data = raw_stream(gateway, body)
    assert response.status_code == 200
    # the mock always sends usage (the gateway asks for it); the client sees it only if it asked
    expected = expected_mock_stream("mock-ok", usage=include_usage)
    assert events(data) == events(expected)  # event for event
    assert data == expected  # and byte for byte


def test_stream_response_headers(gateway, mock):
    response, data = raw_stream(gateway, {"model": "gpt-test", "messages": HI})
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "text/event-stream"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["cache-control"] == "no-cache"
    assert "content-length" not in response.headers
    log_id = response.headers["x-respan-log-id"]
    assert len(log_id) == 32
    assert len(response.headers["x-respan-gateway-request-id"]) == 32
    float(response.headers["x-llmrelay-overhead-ms"])
    assert gateway.record(log_id)["status_code"] == 200


def test_stream_tool_calls(gateway, mock):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    stream = client(gateway).chat.completions.with_raw_response.create(
        model="mock/mock-tools", messages=[{"role": "user", "content": "weather?"}], tools=tools,
        tool_choice="required", stream=True,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for c in stream.parse():
        assert c.usage is None
        for choice in c.choices:
            add_tool_call_deltas(calls, choice.delta.tool_calls)
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}}
    assert mock.last()["body"]["tools"] == tools
    assert mock.last()["body"]["tool_choice"] == "required"

    record = gateway.record(stream.headers["x-respan-log-id"])
    assert record["status_code"] == 200
    assert record["tool_calls"] == [{"id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    assert record["completion_message"]["tool_calls"] == record["tool_calls"]
    assert record["tools"] == tools
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 7)


def test_stream_cut_mid_way_sdk(gateway, mock):
    stream = client(gateway).chat.completions.with_raw_response.create(
        model="mock/mock-cut-3", messages=HI, stream=True,
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for c in stream.parse():
            received.append(c.choices[0].delta.content)
    assert received == WORDS[:3]
    assert "broke the stream" in info.value.message
    assert "'mock'" in info.value.message
    assert info.value.body["code"] == 502

    record = gateway.record(stream.headers["x-respan-log-id"])
    assert record["status_code"] == 502
    assert record["status"] == "error"
    assert record["error_message"] == info.value.message
    assert record["completion_tokens"] == 3  # estimated: one token per content delta
    assert record["prompt_tokens"] == 1  # estimated: "hi" is about one token
    assert record["warnings"] == ["usage estimated: the stream ended before the provider reported usage",
                                  "no price known for mock/mock-cut-3: cost not computed"]
    assert record["completion_message"] == {"role": "assistant", "content": "".join(WORDS[:3])}


def test_stream_cut_mid_way_raw(gateway, mock):
    response, data = raw_stream(gateway, {"model": "mock/mock-cut-3", "messages": HI})
    assert response.status_code == 200  # the status went out with the first byte
    payloads = events(data)
    assert payloads[:3] == [events(chunk("mock-cut-3", {"content": w}))[0] for w in WORDS[:3]]
    assert payloads[-1] == b"[DONE]"
    assert len(payloads) == 5
    error = orjson.loads(payloads[-2])
    assert set(error) == {"error"}
    assert error["error"]["code"] == 502
    assert error["error"]["type"] == "upstream_error"
    assert "broke the stream" in error["error"]["message"]
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502
    assert record["error_message"] == error["error"]["message"]


def test_stream_without_done_or_finish_reason(gateway, mock):
    response, data = raw_stream(gateway, {"model": "mock/mock-no-done", "messages": HI})
    assert response.status_code == 200
    payloads = events(data)
    assert len(payloads) == 1 + len(WORDS) + 2  # role, words, error, [DONE]
    assert payloads[-1] == b"[DONE]"
    error = orjson.loads(payloads[-2])
    assert error == {"error": {"message": "provider 'mock' ended the stream early",
                               "type": "upstream_error", "code": 502}}
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502
    assert record["error_message"] == "provider 'mock' ended the stream early"
    assert record["completion_tokens"] == len(WORDS)
    assert record["warnings"] == ["usage estimated: the stream ended before the provider reported usage",
                                  "no price known for mock/mock-no-done: cost not computed"]

    with pytest.raises(openai.APIError) as info:
        list(client(gateway).chat.completions.create(model="mock/mock-no-done", messages=HI, stream=True))
    assert info.value.message == "provider 'mock' ended the stream early"


def test_stream_n_greater_than_one(gateway, mock):
    stream = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, stream=True, n=2,
    )
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in stream.parse():
        assert c.usage is None
        for choice in c.choices:
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert text == {0: ANSWER, 1: ANSWER}
    assert finish == {0: "stop", 1: "stop"}
    assert mock.last()["body"]["n"] == 2

    record = gateway.record(stream.headers["x-respan-log-id"])
    assert record["status_code"] == 200
    assert record["completion_messages"] == [{"role": "assistant", "content": ANSWER}] * 2


def test_stream_n_greater_than_one_bytes(gateway, mock):
    response, data = raw_stream(gateway, {"model": "gpt-test", "messages": HI, "n": 2,
                                          "stream_options": {"include_usage": True}})
    assert data == expected_mock_stream("mock-ok", usage=True, n=2)


def test_stream_upstream_error_before_first_byte(gateway, mock):
    """An upstream 4xx on a stream request is an ordinary JSON error, not an SSE stream."""
    response, data = raw_stream(gateway, {"model": "mock/mock-status-429", "messages": HI})
    assert response.status_code == 429
    assert response.headers["content-type"].startswith("application/json")
    assert orjson.loads(data)["error"]["code"] == "mock_429"
    with pytest.raises(openai.RateLimitError):
        client(gateway).chat.completions.create(model="mock/mock-status-429", messages=HI, stream=True)
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 429
    assert record["error_message"] == "429: mock upstream error 429"


def test_stream_disable_log_keeps_tokens_drops_content(gateway, mock):
    stream = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, stream=True, extra_body={"disable_log": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices) == ANSWER
    assert "disable_log" not in mock.last()["body"]
    record = gateway.record(stream.headers["x-respan-log-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 7)
    assert record["prompt_messages"] is None
    assert record["completion_message"] is None


def test_a_client_that_leaves_right_after_done_is_not_a_disconnect(gateway, mock):
    """The provider keeps its response open after [DONE]; the client has its whole answer and leaves.
    That is a complete request (200), not a client that went away mid-stream (499)."""
    with httpx.stream("POST", f"{gateway.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "mock/mock-linger", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]}, timeout=10) as response:
        log_id = response.headers["x-respan-log-id"]
        for line in response.iter_lines():
            if line == "data: [DONE]":
                break
    record = gateway.record(log_id, timeout=5)
    assert record["status_code"] == 200 and record["error_message"] == ""
    assert record["completion_tokens"] == 7


def test_a_client_gone_before_the_stream_starts_is_still_logged(mock, tmp_path):
    """The server cannot even send the stream's headers (the client left): the relay never runs,
    yet the request is logged once as a client that left, and nothing stays in flight."""
    import asyncio

    import yaml

    from proxy.app import build_app
    from proxy.logs.sinks.sqlite import read_records
    from proxy.settings import load_settings
    from tests.conftest import app_lifespan, base_config

    config = tmp_path / "llmrelay.yaml"
    config.write_text(yaml.safe_dump(base_config(mock, tmp_path)))
    app = build_app(load_settings(str(config)))
    body = orjson.dumps({"model": "gpt-test", "messages": HI, "stream": True})
    scope = {"type": "http", "method": "POST", "path": "/api/chat/completions", "query_string": b"",
             "client": ("127.0.0.1", 5000),
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]}

    async def scenario() -> int:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            raise OSError("the client is gone")

        async with app_lifespan(app):
            await app(scope, receive, send)
            return app.gateway.metrics.in_flight_now

    assert asyncio.run(scenario()) == 0
    rows = read_records(tmp_path / "logs.db")
    assert [(r["status_code"], r["stream"]) for r in rows] == [(499, True)]
    assert "before the stream started" in rows[0]["error_message"]
