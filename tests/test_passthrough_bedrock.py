"""The native Anthropic passthrough (/api/anthropic/v1/messages, count_tokens) served by Bedrock:
the official `anthropic` SDK against a real gateway process, tests/mock_bedrock.py (Bedrock's
InvokeModel, InvokeModelWithResponseStream and CountTokens, checking every SigV4 signature) and
tests/mock_anthropic.py (for X-Respan-Route-Provider: bedrock).

Unit tests of proxy.providers.bedrock_anthropic come first."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from proxy.call import Call
from proxy.params import GatewayParams
from proxy.providers import bedrock_anthropic as native
from proxy.providers.eventstream import EventStreamDecoder, EventStreamError
from proxy.upstream import UpstreamStreamError
from tests.conftest import KEY, GatewayProcess, module_gateway, openai_client, server_fixtures
from tests.mock_anthropic import MockAnthropic
from tests.mock_bedrock import ANTHROPIC_TOOLS, TEXT, MockBedrock, chunk, exception, frame

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
SERVED = "claude-sonnet-4-5-20250929"  # the model name Bedrock's answer carries
PRICES = {"input": 2.0, "output": 7.0, "cached_input": 0.2}  # not the catalog's 3 / 15 for SONNET
COST = (12 * 2.0 + 6 * 7.0) / 1e6  # mock_bedrock.ANTHROPIC_USAGE: 12 input, 6 output
HI = [{"role": "user", "content": "hi"}]
BETAS = "context-1m-2025-08-07, interleaved-thinking-2025-05-14"
NO_RETRY = {"retry_params": {"retry_enabled": False}}
MESSAGES_URL = "/api/anthropic/v1/messages"


# -- units ------------------------------------------------------------------------------------


def native_call(body: dict[str, Any], headers: dict[str, str] | None = None, endpoint: str = "anthropic.messages",
                extra_headers: dict[str, str] | None = None) -> Call:
    params = GatewayParams(extra_headers=extra_headers)
    return Call(endpoint=endpoint, path=MESSAGES_URL, body=body, params=params, headers=headers or {},
                client_format="anthropic")


def test_invoke_body():
    body = {"model": "m", "stream": True, "max_tokens": 10, "messages": HI, "metadata": {"user_id": "u"}}
    call = native_call(body, {"anthropic-beta": " a-1 ,b-2,, a-1", "anthropic-version": "2023-06-01"})
    assert native.invoke_body(call, "bedrock-2023-05-31") == {
        "max_tokens": 10, "messages": HI, "metadata": {"user_id": "u"}, "anthropic_version": "bedrock-2023-05-31",
        "anthropic_beta": ["a-1", "b-2"]}
    assert call.body["model"] == "m"  # the client's body is not changed
    # metadata.extra_headers may replace the header; the rest of them go upstream, never Anthropic's own
    call = native_call({"messages": HI}, {"anthropic-beta": "a-1"},
                       extra_headers={"Anthropic-Beta": "c-3", "X-Trace": "t", "anthropic-version": "x"})
    assert native.invoke_body(call, "v")["anthropic_beta"] == ["c-3"]
    assert native.upstream_headers(call) == {"x-trace": "t"}
    assert "anthropic_beta" not in native.invoke_body(native_call({"messages": HI}), "v")


def test_count_tokens_body_and_answer():
    call = native_call({"model": "m", "messages": HI}, endpoint="anthropic.count_tokens")
    invoke = native.invoke_body(call, "bedrock-2023-05-31")
    assert invoke == {"messages": HI, "anthropic_version": "bedrock-2023-05-31", "max_tokens": 4096}
    thinking = {"type": "enabled", "budget_tokens": 2000}
    call = native_call({"messages": HI, "thinking": thinking}, endpoint="anthropic.count_tokens")
    assert native.invoke_body(call, "v")["max_tokens"] == 6096
    sent = orjson.loads(native.count_tokens_body(invoke))
    assert list(sent) == ["input"] and list(sent["input"]) == ["invokeModel"]
    assert orjson.loads(base64.b64decode(sent["input"]["invokeModel"]["body"])) == invoke
    assert native.count_tokens_answer(b'{"inputTokens": 42}') == b'{"input_tokens":42}'
    assert native.count_tokens_answer(b'{"input_tokens": 42}') is None
    assert native.count_tokens_answer(b"nope") is None
    assert native.count_tokens_model(SONNET) == "anthropic.claude-sonnet-4-5-20250929-v1:0"
    assert native.count_tokens_model("global.anthropic.claude-x") == "anthropic.claude-x"
    assert native.count_tokens_model("anthropic.claude-x") == "anthropic.claude-x"
    arn = "arn:aws:bedrock:us-east-1:1:application-inference-profile/us.anthropic.x"
    assert native.count_tokens_model(arn) == arn


@pytest.mark.parametrize(("status", "aws_type", "kind"), [
    (429, "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/", "rate_limit_error"),
    (503, "ServiceUnavailableException", "overloaded_error"),
    (408, "ModelTimeoutException", "timeout_error"),
    (424, "ModelErrorException", "api_error"),
    (400, "ValidationException", "invalid_request_error"),
    (403, "InvalidSignatureException", "permission_error"),
    (404, None, "not_found_error"),
    (502, None, "api_error"),
])
def test_error_types(status, aws_type, kind):
    body = orjson.loads(native.error_body(status, "boom", aws_type))
    assert body == {"type": "error", "error": {"type": kind, "message": "boom"}}


def test_model_check():
    assert native.is_anthropic_model(SONNET) and native.is_anthropic_model("claude-sonnet-test")
    assert native.is_anthropic_model("arn:aws:bedrock:us-east-1:1:application-inference-profile/abc")
    assert not native.is_anthropic_model("meta.llama3-70b-instruct-v1:0")


def test_stream_events_keep_the_decoded_bytes():
    raw = b'{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}'
    multiline = b'{"type": "ping",\n "x": 1}'
    data = chunk(raw) + frame({":event-type": "other", ":message-type": "event"}, b"{}") + chunk(multiline)
    events = native.StreamEvents()
    decoder = EventStreamDecoder()
    out = b"".join(events.feed(decoder.feed(data[i:i + 5])) for i in range(0, len(data), 5))
    assert out == (b"event: content_block_delta\ndata: " + raw + b"\n\n"
                   + b'event: ping\ndata: {"type":"ping","x":1}\n\n')  # a line break: re-serialized
    assert not events.done and not events.failed
    assert events.feed(decoder.feed(chunk(b'{"type": "message_stop"}') + chunk(b'{"type": "ping"}'))) == \
        b'event: message_stop\ndata: {"type": "message_stop"}\n\n'  # nothing after message_stop
    assert events.done


def test_stream_events_exceptions_and_bad_chunks():
    events = native.StreamEvents()
    out = events.feed(EventStreamDecoder().feed(exception("serviceUnavailableException", "try later")
                                                + chunk(b'{"type": "ping"}')))
    assert out == b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"try later"}}\n\n'
    assert events.failed
    events = native.StreamEvents()
    bad = frame({":event-type": "chunk", ":message-type": "event"}, b'{"bytes": "not base64!"}')
    with pytest.raises(EventStreamError):
        events.feed(EventStreamDecoder().feed(bad))


class FakeResponse:
    """An UpstreamResponse stand-in: `chunks()` yields `parts`, and says whether it was closed."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            for part in self.parts:
                yield part
        finally:
            self.closed = True


def test_relay_stream_closes_and_raises():
    async def run(parts: list[bytes], take: int | None = None) -> tuple[list[bytes], Exception | None, bool]:
        response = FakeResponse(parts)
        stream = native.relay_stream(response, "bedrock")  # type: ignore[arg-type]
        out: list[bytes] = []
        error: Exception | None = None
        try:
            async for data in stream:
                out.append(data)
                if take is not None and len(out) == take:
                    await stream.aclose()  # the client left
                    break
        except UpstreamStreamError as exc:
            error = exc
        return out, error, response.closed

    start, stop = chunk(b'{"type": "message_start"}'), chunk(b'{"type": "message_stop"}')
    out, error, closed = asyncio.run(run([start, stop]))
    assert error is None and closed and out[-1].startswith(b"event: message_stop")
    out, error, closed = asyncio.run(run([start, stop], take=1))
    assert len(out) == 1 and error is None and closed
    out, error, closed = asyncio.run(run([start]))
    assert isinstance(error, UpstreamStreamError) and "before the message was complete" in str(error) and closed
    out, error, closed = asyncio.run(run([start, stop[:-1] + bytes([stop[-1] ^ 1])]))
    assert isinstance(error, UpstreamStreamError) and "broken event stream" in str(error) and closed
    out, error, closed = asyncio.run(run([start, exception("throttlingException", "slow"), stop]))
    assert error is None and closed and b'"rate_limit_error"' in out[-1] and b"message_stop" not in b"".join(out)


# -- end to end ------------------------------------------------------------------------------


bedrock_mock, bmock = server_fixtures(MockBedrock, "bedrock_mock", "bmock")
anthropic_mock, amock = server_fixtures(MockAnthropic, "anthropic_mock", "amock")


@pytest.fixture(scope="module")
def gw(mock_upstream, bedrock_mock: MockBedrock, anthropic_mock: MockAnthropic,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    def bedrock(name: str, model: str, provider: str = "bedrock") -> dict[str, Any]:
        return {"name": name, "provider": provider, "model": model, "prices": PRICES}

    yield from module_gateway(
        tmp_path_factory, "gateway-bedrock-passthrough", mock_upstream, pipeline=["auth", "routing", "fallback"],
        extra_providers=[
            {"id": "bedrock", "protocol": "bedrock", "base_url": bedrock_mock.base_url, "api_key": "AKIDEXAMPLE:secret"},
            {"id": "bedrock-wrong", "protocol": "bedrock", "base_url": bedrock_mock.base_url,
             "api_key": "AKIDEXAMPLE:not-the-secret"},
            {"id": "anthropic", "protocol": "anthropic", "base_url": anthropic_mock.base_url,
             "api_key": "sk-ant-upstream"},
        ],
        extra_models=[
            bedrock("claude-bedrock", SONNET),
            bedrock("claude-bedrock-tools", "us.anthropic.claude-tools-v1:0"),
            bedrock("claude-bedrock-throttled", "anthropic.claude-throttled-v1:0"),
            bedrock("claude-bedrock-throttled-first", "anthropic.claude-throttled-first-v1:0"),
            bedrock("claude-bedrock-cut", "anthropic.claude-cut-v1:0"),
            bedrock("claude-bedrock-garbled", "anthropic.claude-garbled-v1:0"),
            bedrock("claude-bedrock-400", "anthropic.claude-status-400"),
            bedrock("claude-bedrock-429", "anthropic.claude-status-429"),
            bedrock("claude-bedrock-503", "anthropic.claude-status-503"),
            bedrock("claude-bedrock-wrong", SONNET, provider="bedrock-wrong"),
            bedrock("llama-bedrock", "meta.llama3-70b-instruct-v1:0"),
            {"name": "claude-test", "provider": "anthropic", "model": "claude-sonnet-test", "prices": PRICES},
            {"name": "claude-sonnet", "provider": "anthropic", "model": "claude-sonnet-4-5-20250929", "prices": PRICES},
        ],
    )


def client(gw: GatewayProcess, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/api/anthropic/", api_key=KEY, max_retries=0, **kwargs)


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.split(b"\n\n"):
        if block.strip():
            name, data = block.split(b"\n", 1)
            assert name.startswith(b"event: ") and data.startswith(b"data: "), block
            out.append((name[7:].decode(), orjson.loads(data[6:])))
    return out


def expected_sse(mock: MockBedrock, model: str) -> bytes:
    """The SSE bytes the gateway should send for the events the mock streams for `model`."""
    return b"".join(b"event: " + orjson.loads(e)["type"].encode() + b"\ndata: " + e + b"\n\n"
                    for e in mock.anthropic_events(model))


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_messages_whole(gw, bmock):
    raw = client(gw).messages.with_raw_response.create(
        model="claude-bedrock", max_tokens=100, messages=HI, system="Be brief.", extra_headers={"anthropic-beta": BETAS},
        metadata={"user_id": "u-1", "respan_params": {"customer_identifier": "bd-whole", "metadata": {"team": "x"}}})
    message = raw.parse()
    assert message.content[0].text == TEXT and message.model == SERVED
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 6)
    sent = bmock.last()
    assert raw.http_response.content == sent["answer"]  # the answer's bytes, unchanged
    assert sent["path"] == f"/model/{SONNET}/invoke"
    assert sent["signer"] == {"access_key": "AKIDEXAMPLE", "region": "us-east-1", "session_token": None}
    assert sent["body"] == {"max_tokens": 100, "messages": HI, "system": "Be brief.", "metadata": {"user_id": "u-1"},
                            "anthropic_version": "bedrock-2023-05-31",
                            "anthropic_beta": ["context-1m-2025-08-07", "interleaved-thinking-2025-05-14"]}
    headers = lower(sent["headers"])
    assert "anthropic-beta" not in headers and "anthropic-version" not in headers and "x-api-key" not in headers
    assert headers["accept"] == "application/json"
    assert raw.headers["x-request-id"] == "req-mock-invoke" and raw.headers["x-llmrelay-provider"] == "bedrock"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "chat" and record["status_code"] == 200 and not record["stream"]
    assert record["provider_id"] == "bedrock" and record["model"] == SERVED
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx(COST)
    assert record["customer_identifier"] == "bd-whole" and record["metadata"] == {"team": "x"}
    assert record["prompt_messages"][0] == {"role": "system", "content": "Be brief."}
    assert record["completion_message"]["content"] == TEXT


def test_stream_helper(gw, bmock):
    with client(gw).messages.stream(model="claude-bedrock", max_tokens=50, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT and final.model == SERVED and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (12, 6)
    sent = bmock.last()
    assert sent["path"] == f"/model/{SONNET}/invoke-with-response-stream"
    assert "stream" not in sent["body"] and "model" not in sent["body"]
    assert lower(sent["headers"])["accept"] == "application/vnd.amazon.eventstream"


def test_stream_raw_bytes_and_log(gw, bmock, bedrock_mock):
    with httpx.stream("POST", gw.url + MESSAGES_URL, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                      json={"model": "claude-bedrock", "max_tokens": 50, "messages": HI, "stream": True,
                            "metadata": {"respan_params": {"customer_identifier": "bd-raw"}}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_bytes())
        log_id = response.headers["x-respan-log-id"]
    assert body == expected_sse(bedrock_mock, SONNET)  # the decoded events, byte for byte
    assert b'"type": "message_start"' in body  # as the mock wrote them (json.dumps), not re-serialized
    assert b"[DONE]" not in body
    record = gw.record(log_id)
    assert record["stream"] and record["status_code"] == 200 and record["customer_identifier"] == "bd-raw"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx(COST)
    assert record["model"] == SERVED and record["completion_message"]["content"] == TEXT


def test_tools(gw, bmock):
    tools = [{"name": name, "input_schema": {"type": "object"}} for _, name, _ in ANTHROPIC_TOOLS]
    message = client(gw).messages.create(model="claude-bedrock-tools", max_tokens=100, messages=HI, tools=tools)
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.stop_reason == "tool_use"
    assert bmock.last()["body"]["tools"] == tools
    events = list(client(gw).messages.create(model="claude-bedrock-tools", max_tokens=100, messages=HI, tools=tools,
                                             stream=True))
    pieces = [e.delta.partial_json for e in events
              if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert "".join(pieces) == "".join(orjson.dumps(args).decode() for _, _, args in ANTHROPIC_TOOLS)
    with client(gw).messages.stream(model="claude-bedrock-tools", max_tokens=100, messages=HI, tools=tools,
                                    metadata={"respan_params": {"customer_identifier": "bd-tools"}}) as stream:
        final = stream.get_final_message()
    assert [(b.id, b.name, b.input) for b in final.content if b.type == "tool_use"] == ANTHROPIC_TOOLS
    rows = gw.records(count=1, where="customer_identifier = ?", args=("bd-tools",))
    assert [c["function"]["name"] for c in rows[-1]["tool_calls"]] == ["get_weather", "get_time"]


def test_exception_mid_stream(gw, bmock):
    with httpx.stream("POST", gw.url + MESSAGES_URL, headers={"x-api-key": KEY},
                      json={"model": "claude-bedrock-throttled", "max_tokens": 50, "messages": HI,
                            "stream": True}) as response:
        body = b"".join(response.iter_bytes())
        log_id = response.headers["x-respan-log-id"]
    events = sse_events(body)
    assert events[0][0] == "message_start" and "message_stop" not in [name for name, _ in events]
    assert "".join(d["delta"]["text"] for name, d in events if name == "content_block_delta") == TEXT
    assert events[-1] == ("error", {"type": "error", "error": {
        "type": "rate_limit_error", "message": "Too many requests, please wait before trying again."}})
    record = gw.record(log_id)
    assert record["status_code"] == 429 and "Too many requests" in record["error_message"]
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)  # input of message_start, a token a delta
    assert record["cost"] == pytest.approx(COST)
    with pytest.raises(anthropic.APIStatusError), client(gw).messages.stream(
            model="claude-bedrock-throttled", max_tokens=10, messages=HI) as stream:
        "".join(stream.text_stream)


@pytest.mark.parametrize(("model", "error"), [("claude-bedrock-cut", "before the message was complete"),
                                              ("claude-bedrock-garbled", "broken event stream")])
def test_broken_stream_ends_with_error_event(gw, bmock, model, error):
    with httpx.stream("POST", gw.url + MESSAGES_URL, headers={"x-api-key": KEY},
                      json={"model": model, "max_tokens": 50, "messages": HI, "stream": True}) as response:
        body = b"".join(response.iter_bytes())
        log_id = response.headers["x-respan-log-id"]
    events = sse_events(body)
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error" and error in events[-1][1]["error"]["message"]
    record = gw.record(log_id)
    assert record["status_code"] == 502 and error in record["error_message"]
    assert record["prompt_tokens"] == 12  # from message_start
    assert record["completion_tokens"] == 6  # every delta before the break (a bad frame loses none before it)


def test_throttled_first_event_falls_back(gw, bmock):
    params = {"fallback_models": ["claude-bedrock"], "customer_identifier": "bd-fallback"}
    with client(gw).messages.stream(model="claude-bedrock-throttled-first", max_tokens=10, messages=HI,
                                    metadata={"respan_params": params}) as stream:
        text = "".join(stream.text_stream)
    assert text == TEXT
    assert [r["model"] for r in bmock.requests] == ["anthropic.claude-throttled-first-v1:0", SONNET]
    record = gw.records(count=1, where="customer_identifier = ?", args=("bd-fallback",))[-1]
    assert record["fallback"] and record["status_code"] == 200 and record["model"] == SERVED
    assert [a["status"] for a in record["attempts"]] == [429, 200]
    # without a fallback: the throttling comes back as Anthropic's rate-limit error
    with pytest.raises(anthropic.RateLimitError) as info, client(gw).messages.stream(
            model="claude-bedrock-throttled-first", max_tokens=10, messages=HI,
            metadata={"respan_params": NO_RETRY}) as stream:
        "".join(stream.text_stream)
    assert info.value.body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize(("model", "exc", "kind"), [
    ("claude-bedrock-400", anthropic.BadRequestError, "invalid_request_error"),
    ("claude-bedrock-429", anthropic.RateLimitError, "rate_limit_error"),
    ("claude-bedrock-503", anthropic.InternalServerError, "overloaded_error"),
])
def test_upstream_errors_in_anthropic_shape(gw, bmock, model, exc, kind):
    for stream in (False, True):
        with pytest.raises(exc) as info:
            client(gw).messages.create(model=model, max_tokens=10, messages=HI, stream=stream,
                                       metadata={"respan_params": NO_RETRY})
        status = int(model.rsplit("-", 1)[1])
        assert info.value.status_code == status
        assert info.value.body == {"type": "error", "error": {"type": kind, "message": f"mock error {status}"}}
        assert bmock.last()["path"].endswith("/invoke-with-response-stream" if stream else "/invoke")


def test_bad_signature_is_a_403_in_anthropic_shape(gw, bmock):
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        client(gw).messages.create(model="claude-bedrock-wrong", max_tokens=10, messages=HI)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "permission_error"
    assert "signature we calculated does not match" in info.value.body["error"]["message"]
    assert bmock.last()["signer"] is None and bmock.last()["path"].endswith("/invoke")


def test_count_tokens(gw, bmock):
    raw = client(gw).messages.with_raw_response.count_tokens(
        model="claude-bedrock", messages=HI, system="Be brief.", extra_headers={"anthropic-beta": BETAS},
        extra_body={"metadata": {"respan_params": {"customer_identifier": "bd-count"}}})
    count = raw.parse()
    assert count.input_tokens == len(orjson.dumps(["Be brief.", HI, None])) // 4
    sent = bmock.last()
    # CountTokens takes the foundation model, not the cross-Region profile (the mock refuses `us.`)
    assert sent["path"] == "/model/anthropic.claude-sonnet-4-5-20250929-v1:0/count-tokens"
    assert list(sent["body"]) == ["input"]
    assert sent["invoke_body"] == {"messages": HI, "system": "Be brief.", "anthropic_version": "bedrock-2023-05-31",
                                   "anthropic_beta": ["context-1m-2025-08-07", "interleaved-thinking-2025-05-14"],
                                   "max_tokens": 4096}
    assert raw.http_response.json() == {"input_tokens": count.input_tokens}
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "count_tokens" and record["status_code"] == 200 and record["cost"] == 0
    assert record["prompt_tokens"] == count.input_tokens and record["provider_id"] == "bedrock"


def test_route_provider_bedrock(gw, bmock, amock):
    c = client(gw, default_headers={"X-Respan-Route-Provider": "bedrock"})
    message = c.messages.create(model="claude-test", max_tokens=10, messages=HI,
                                metadata={"respan_params": {"customer_identifier": "bd-route"}})
    assert message.content[0].text == TEXT
    with c.messages.stream(model="claude-test", max_tokens=10, messages=HI) as stream:
        assert "".join(stream.text_stream) == TEXT
    assert c.messages.count_tokens(model="claude-test", messages=HI).input_tokens > 0
    assert [r["path"] for r in bmock.requests] == [
        "/model/claude-sonnet-test/invoke", "/model/claude-sonnet-test/invoke-with-response-stream",
        "/model/claude-sonnet-test/count-tokens"]
    assert not amock.requests
    record = gw.records(count=1, where="customer_identifier = ?", args=("bd-route",))[-1]
    assert record["provider_id"] == "bedrock" and record["cost"] == pytest.approx(COST)
    # the same model without the header stays on Anthropic
    assert client(gw).messages.create(model="claude-test", max_tokens=10, messages=HI).content
    assert len(amock.requests) == 1 and len(bmock.requests) == 3


def test_route_provider_respells_claude_names(gw, bmock, amock):
    """Claude Code's name on Anthropic, moved to Bedrock: Bedrock's spelling, and its catalog prices."""
    c = client(gw, default_headers={"X-Respan-Route-Provider": "bedrock"})
    raw = c.messages.with_raw_response.create(model="claude-sonnet", max_tokens=10, messages=HI)
    assert raw.parse().content[0].text == TEXT
    assert c.messages.count_tokens(model="claude-sonnet", messages=HI).input_tokens > 0
    assert [r["path"] for r in bmock.requests] == [
        f"/model/{SONNET}/invoke", "/model/anthropic.claude-sonnet-4-5-20250929-v1:0/count-tokens"]
    assert not amock.requests
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["provider_id"] == "bedrock" and record["cost"] == pytest.approx((12 * 3.0 + 6 * 15.0) / 1e6)


def test_non_claude_model_is_a_400(gw, bmock):
    with pytest.raises(anthropic.BadRequestError) as info:
        client(gw).messages.create(model="llama-bedrock", max_tokens=10, messages=HI)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "Claude models only" in info.value.body["error"]["message"]
    assert not bmock.requests


def test_openai_clients_still_get_converse(gw, bmock):
    completion = openai_client(gw).chat.completions.create(model="claude-bedrock", messages=HI, max_tokens=20)
    assert completion.choices[0].message.content == TEXT
    assert bmock.last()["path"] == f"/model/{SONNET}/converse"
    assert bmock.last()["body"]["inferenceConfig"] == {"maxTokens": 20}
