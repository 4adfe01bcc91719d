"""The native Anthropic passthrough (/api/anthropic/v1/messages, spec 2.2): the official `anthropic`
SDK against a real gateway process and tests/mock_anthropic.py (and tests/mock_vertex.py for
X-Respan-Route-Provider: vertex_ai)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from proxy.call import Call
from proxy.endpoints.anthropic import read_call
from proxy.params import EMPTY
from proxy.sse_anthropic import AnthropicStreamTap
from tests.conftest import KEY, GatewayProcess, module_gateway, server_fixtures
from tests.mock_anthropic import TEXT, TOOLS, MockAnthropic
from tests.mock_vertex import COUNT_TOKENS as VERTEX_COUNT_TOKENS
from tests.mock_vertex import MockVertex
from tests.test_provider_vertex import serving_vertex

PRICES = {"input": 3.0, "output": 15.0, "cached_input": 0.3}
COST = (12 * 3.0 + 6 * 15.0) / 1e6  # mock_anthropic.USAGE: 12 input, 6 output
HI = [{"role": "user", "content": "hi"}]


amock, mock = server_fixtures(MockAnthropic, "amock", "mock")


@pytest.fixture(scope="module")
def vmock(tmp_path_factory) -> Iterator[tuple[MockVertex, dict[str, str]]]:
    yield from serving_vertex(tmp_path_factory.mktemp("vertex-keys"))


@pytest.fixture(scope="module")
def gw(mock_upstream, amock, vmock, tmp_path_factory) -> Iterator[GatewayProcess]:
    vertex, env = vmock
    yield from module_gateway(
        tmp_path_factory, "gateway-anthropic-passthrough", mock_upstream, env=env,
        pipeline=["auth", "routing", "fallback"],
        extra_providers=[
            {"id": "anthropic", "protocol": "anthropic", "base_url": amock.base_url, "api_key": "sk-ant-upstream"},
            {"id": "vertex", "protocol": "vertex_ai", "api_key": "${VERTEX_SA_JSON}",
             "base_url": f"{vertex.base_url}/v1/projects/proj-test/locations/us-central1"},
        ],
        extra_models=[
            {"name": "claude-test", "provider": "anthropic", "model": "claude-sonnet-test", "prices": PRICES},
            {"name": "claude-tools", "provider": "anthropic", "model": "claude-tools", "prices": PRICES},
            {"name": "claude-error-first", "provider": "anthropic", "model": "claude-stream-error-first",
             "prices": PRICES},
            {"name": "claude-cut", "provider": "anthropic", "model": "claude-cut", "prices": PRICES},
            {"name": "claude-vertex-overloaded", "provider": "vertex", "model": "claude-overloaded@20250101"},
        ],
    )


def client(gw: GatewayProcess, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/api/anthropic/", api_key=kwargs.pop("api_key", KEY),
                               max_retries=0, **kwargs)


def log_id(response: httpx.Response) -> str:
    return response.headers["x-respan-log-id"]


def test_messages_whole(gw, mock):
    raw = client(gw).messages.with_raw_response.create(
        model="claude-test", max_tokens=100, messages=HI, system="Be brief.",
        metadata={"user_id": "u-1", "respan_params": {"customer_identifier": "cust-9", "metadata": {"team": "x"}}},
    )
    message = raw.parse()
    assert message.content[0].text == TEXT
    assert message.usage.input_tokens == 12 and message.usage.output_tokens == 6
    sent = mock.last()
    assert sent["path"] == "/v1/messages"
    assert sent["body"]["model"] == "claude-sonnet-test"
    assert sent["body"]["metadata"] == {"user_id": "u-1"}  # respan_params never reach Anthropic
    assert sent["body"]["system"] == "Be brief."
    assert sent["headers"]["x-api-key"] == "sk-ant-upstream"
    assert sent["headers"]["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "chat" and record["status_code"] == 200
    assert record["prompt_tokens"] == 12 and record["completion_tokens"] == 6
    assert record["cost"] == pytest.approx(COST)
    assert record["customer_identifier"] == "cust-9"
    assert record["metadata"] == {"team": "x"}
    assert record["prompt_messages"][0] == {"role": "system", "content": "Be brief."}
    assert record["completion_message"]["content"] == TEXT


def test_bytes_whole_unchanged_and_default_max_tokens(gw, mock):
    response = httpx.post(f"{gw.url}/api/anthropic/v1/messages", headers={"x-api-key": KEY,
                          "anthropic-version": "2023-06-01", "anthropic-beta": "beta-x"},
                          json={"model": "claude-test", "messages": HI, "metadata": {"respan_params": {}}})
    assert response.status_code == 200
    sent = mock.last()
    assert sent["body"]["max_tokens"] == 4096
    assert "metadata" not in sent["body"]
    assert sent["headers"]["anthropic-beta"] == "beta-x"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    data = response.json()
    assert data["id"] == "msg_mock01" and data["model"] == "claude-sonnet-test-20250101"


def test_stream_helper_and_raw_bytes(gw, mock):
    with client(gw).messages.stream(model="claude-test", max_tokens=50, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT and final.usage.output_tokens == 6
    # raw events: the bytes the client gets are the bytes the mock sent
    with httpx.stream("POST", f"{gw.url}/api/anthropic/v1/messages", headers={"authorization": f"Bearer {KEY}",
                      "anthropic-version": "2023-06-01"},
                      json={"model": "claude-test", "max_tokens": 50, "messages": HI, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_bytes())
        lid = log_id(response)
    assert body == b"".join(mock.events("claude-sonnet-test"))
    assert b"[DONE]" not in body
    record = gw.record(lid)
    assert record["stream"] and record["status_code"] == 200
    assert record["prompt_tokens"] == 12 and record["completion_tokens"] == 6
    assert record["cost"] == pytest.approx(COST)
    assert record["completion_message"]["content"] == TEXT
    # the SDK's raw events
    events = list(client(gw).messages.create(model="claude-test", max_tokens=50, messages=HI, stream=True))
    assert events[0].type == "message_start" and events[-1].type == "message_stop"


def test_tools(gw, mock):
    tools = [{"name": name, "input_schema": {"type": "object"}} for _, name, _ in TOOLS]
    message = client(gw).messages.create(model="claude-tools", max_tokens=100, messages=HI, tools=tools)
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert mock.last()["body"]["tools"] == tools
    with client(gw).messages.stream(model="claude-tools", max_tokens=100, messages=HI, tools=tools) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [args for _, _, args in TOOLS]
    rows = gw.records(count=1, where="model = ? AND stream = 1", args=("claude-tools-20250101",))
    assert rows and [c["function"]["name"] for c in rows[-1]["tool_calls"]] == ["get_weather", "get_time"]


def test_count_tokens(gw, mock):
    raw = client(gw).messages.with_raw_response.count_tokens(
        model="claude-test", messages=HI, extra_body={"metadata": {"respan_params": {"customer_identifier": "c"}}})
    count = raw.parse()
    assert count.input_tokens > 0
    sent = mock.last()
    assert sent["path"] == "/v1/messages/count_tokens"
    assert sent["body"]["model"] == "claude-sonnet-test" and "metadata" not in sent["body"]
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "count_tokens" and record["cost"] == 0
    assert record["prompt_tokens"] == count.input_tokens


def test_auth_and_errors(gw, mock):
    assert client(gw).messages.create(model="claude-test", max_tokens=10, messages=HI).content  # the SDK's own auth
    response = httpx.post(f"{gw.url}/api/anthropic/v1/messages", headers={"x-api-key": KEY},
                          json={"model": "claude-test", "messages": HI})
    assert response.status_code == 200
    with pytest.raises(anthropic.AuthenticationError) as info:
        client(gw, api_key="sk-wrong").messages.create(model="claude-test", max_tokens=10, messages=HI)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as info:
        client(gw).messages.create(model="no-such-model", max_tokens=10, messages=HI)
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client(gw).messages.create(model="gpt-test", max_tokens=10, messages=HI)  # an OpenAI provider
    response = httpx.post(f"{gw.url}/api/anthropic/v1/messages", headers={"x-api-key": KEY}, content=b"nope")
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    # an upstream error passes through in Anthropic's own shape
    response = httpx.post(f"{gw.url}/api/anthropic/v1/messages", headers={"x-api-key": KEY},
                          json={"model": "claude-test", "messages": [{"role": "user", "content": ""}]})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_error_first_falls_back(gw, mock):
    params = {"fallback_models": ["claude-test"], "customer_identifier": "fb"}
    with client(gw).messages.stream(model="claude-error-first", max_tokens=10, messages=HI,
                                    metadata={"respan_params": params}) as stream:
        text = "".join(stream.text_stream)
    assert text == TEXT
    models = [r["body"]["model"] for r in mock.requests]
    assert models[0] == "claude-stream-error-first" and models[-1] == "claude-sonnet-test"
    rows = gw.records(count=1, where="customer_identifier = ?", args=("fb",))
    assert rows[-1]["fallback"] and rows[-1]["status_code"] == 200
    # without a fallback: the client gets the error as Anthropic's error
    with pytest.raises(anthropic.APIStatusError) as info, client(gw).messages.stream(
            model="claude-error-first", max_tokens=10, messages=HI) as stream:
        "".join(stream.text_stream)
    assert info.value.status_code == 529


def test_stream_cut_ends_with_error_event(gw, mock):
    with httpx.stream("POST", f"{gw.url}/api/anthropic/v1/messages", headers={"x-api-key": KEY},
                      json={"model": "claude-cut", "max_tokens": 50, "messages": HI, "stream": True}) as response:
        body = b"".join(response.iter_bytes())
        lid = log_id(response)
    assert body.startswith(b"event: message_start")
    assert body.endswith(b"\n\n") and b"event: error\ndata: " in body and b"[DONE]" not in body
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert orjson.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "api_error"
    record = gw.record(lid)
    assert record["status_code"] == 502 and record["error_message"]
    assert record["prompt_tokens"] == 12 and record["completion_tokens"] >= 6
    with pytest.raises(anthropic.APIStatusError), client(gw).messages.stream(
            model="claude-cut", max_tokens=10, messages=HI) as stream:
        "".join(stream.text_stream)


def test_route_provider_vertex(gw, mock, vmock):
    vertex, _ = vmock
    vertex.reset()
    c = client(gw, default_headers={"X-Respan-Route-Provider": "vertex_ai"})
    message = c.messages.create(model="claude-test", max_tokens=10, messages=HI,
                                metadata={"respan_params": {"customer_identifier": "vx"}})
    assert message.content[0].text == TEXT
    with c.messages.stream(model="claude-test", max_tokens=10, messages=HI) as stream:
        assert "".join(stream.text_stream) == TEXT
    assert [r["path"].rsplit(":", 1)[1] for r in vertex.requests] == ["rawPredict", "streamRawPredict"]
    body = vertex.requests[0]["body"]
    assert body["anthropic_version"] == "vertex-2023-10-16" and "model" not in body and "metadata" not in body
    assert not mock.requests
    rows = gw.records(count=1, where="customer_identifier = ?", args=("vx",))
    assert rows[-1]["provider_id"] == "vertex" and rows[-1]["cost"] > 0


def test_claude_names_are_respelled_per_provider(gw, mock, vmock):
    """Claude Code sends Anthropic's names; on Vertex AI the same model is `claude-...@date`."""
    vertex, _ = vmock
    vertex.reset()
    dated = "claude-sonnet-4-5-20250929"
    raw = client(gw).messages.with_raw_response.create(model=dated, max_tokens=10, messages=HI)
    assert mock.last()["body"]["model"] == dated  # a catalog model with its dated name, straight to Anthropic
    assert gw.record(raw.headers["x-respan-log-id"])["cost"] == pytest.approx(COST)  # the catalog's 3 / 15 prices
    c = client(gw, default_headers={"X-Respan-Route-Provider": "vertex_ai"})
    raw = c.messages.with_raw_response.create(model=dated, max_tokens=10, messages=HI)
    assert vertex.requests[-1]["model"] == "claude-sonnet-4-5@20250929"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["provider_id"] == "vertex" and record["cost"] == pytest.approx(COST)
    raw = c.messages.with_raw_response.count_tokens(model="claude-sonnet-4-5", messages=HI)
    assert raw.parse().input_tokens == VERTEX_COUNT_TOKENS
    sent = vertex.requests[-1]
    assert (sent["model"], sent["method"]) == ("count-tokens", "rawPredict")
    assert sent["body"]["model"] == "claude-sonnet-4-5@20250929" and "metadata" not in sent["body"]
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "count_tokens" and record["prompt_tokens"] == VERTEX_COUNT_TOKENS
    assert record["cost"] == 0


def test_header_params_and_extra_headers(gw, mock):
    header = base64.b64encode(orjson.dumps({"customer_identifier": "from-header"})).decode()
    client(gw, default_headers={"X-Data-Respan-Params": header}).messages.create(
        model="claude-test", max_tokens=10, messages=HI,
        metadata={"extra_headers": {"anthropic-beta": "context-1m-2025-08-07"}})
    sent = mock.last()
    assert sent["headers"]["anthropic-beta"] == "context-1m-2025-08-07" and "metadata" not in sent["body"]
    assert gw.records(count=1, where="customer_identifier = ?", args=("from-header",))


def test_read_call_units():
    call = Call(endpoint="anthropic.messages", path="/", body={}, params=EMPTY, headers={}, client_format="anthropic")
    read_call(call, orjson.dumps({"model": "m", "messages": HI, "metadata": {
        "user_id": "u", "respan_params": {"customer_identifier": "c"}, "extra_headers": {"x-a": "1"}}}))
    assert call.body == {"model": "m", "messages": HI, "metadata": {"user_id": "u"}, "max_tokens": 4096}
    assert call.params.customer_identifier == "c" and call.params.extra_headers == {"x-a": "1"}


def test_tap_passes_bytes_unchanged():
    mock = MockAnthropic()
    data = b"".join(mock.events("claude-tools"))
    tap = AnthropicStreamTap()
    out = b""
    for i in range(0, len(data), 13):
        chunk = data[i:i + 13]
        assert tap.feed(chunk) is chunk
        out += chunk
    tap.flush()
    assert out == data and tap.done and tap.stop_reason == "tool_use"
    assert tap.final_usage().prompt_tokens == 12 and tap.final_usage().completion_tokens == 6
    message = tap.messages()[0]
    assert message["content"] == "Let me check." and len(message["tool_calls"]) == 2


def vertex_client(gw: GatewayProcess) -> anthropic.AnthropicVertex:
    """Anthropic's own Vertex AI client, pointed at the gateway's Vertex AI passthrough."""
    return anthropic.AnthropicVertex(region="us-east5", project_id="client-proj", access_token=KEY,
                                     base_url=f"{gw.url}/api/google/vertexai/v1", max_retries=0)


def test_vertex_passthrough_with_anthropic_vertex_sdk(gw, mock, vmock):
    vertex, _ = vmock
    vertex.reset()
    c = vertex_client(gw)
    model = "claude-sonnet-4-5@20250929"
    message = c.messages.create(model=model, max_tokens=20, messages=HI,
                                metadata={"user_id": "u-7", "respan_params": {"customer_identifier": "vx-native"}})
    assert message.content[0].text == TEXT
    sent = vertex.requests[-1]
    # the gateway's own provider config decides the project and location, not the client's path
    assert (sent["project"], sent["location"], sent["model"], sent["method"]) == (
        "proj-test", "us-central1", model, "rawPredict")
    assert sent["body"]["anthropic_version"] == "vertex-2023-10-16" and "model" not in sent["body"]
    assert sent["body"]["metadata"] == {"user_id": "u-7"}
    record = gw.records(count=1, where="customer_identifier = ?", args=("vx-native",))[-1]
    assert record["provider_id"] == "vertex" and record["cost"] == pytest.approx(COST)  # catalog: 3 / 15
    with c.messages.stream(model=model, max_tokens=20, messages=HI) as stream:
        assert "".join(stream.text_stream) == TEXT
        assert stream.get_final_message().usage.output_tokens == 6
    assert vertex.requests[-1]["method"] == "streamRawPredict" and vertex.requests[-1]["body"]["stream"] is True
    assert c.messages.count_tokens(model=model, messages=HI).input_tokens == VERTEX_COUNT_TOKENS
    assert vertex.requests[-1]["body"]["model"] == model
    assert not mock.requests


def test_vertex_passthrough_falls_back_to_anthropic(gw, mock, vmock):
    """The same Claude call, routed by the gateway: pinned to Vertex AI, fallback_models may leave it."""
    vertex, _ = vmock
    vertex.reset()
    model = "claude-vertex-overloaded"
    params = {"fallback_models": ["claude-test"], "retry_params": {"retry_enabled": False}}
    response = httpx.post(
        f"{gw.url}/api/google/vertexai/v1/projects/p/locations/l/publishers/anthropic/models/{model}:rawPredict",
        headers={"authorization": f"Bearer {KEY}"},
        json={"anthropic_version": "vertex-2023-10-16", "max_tokens": 10, "messages": HI,
              "metadata": {"respan_params": params}})
    assert response.status_code == 200 and response.json()["content"][0]["text"] == TEXT
    assert [r["model"] for r in vertex.requests] == ["claude-overloaded@20250101"]
    sent = mock.last()  # then Anthropic itself, with Anthropic's own body
    assert sent["body"]["model"] == "claude-sonnet-test" and "anthropic_version" not in sent["body"]
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["fallback"] and [a["status"] for a in record["attempts"]] == [529, 200]


def test_vertex_passthrough_errors(gw, mock):
    base = f"{gw.url}/api/google/vertexai/v1/projects/p/locations/l/publishers"
    response = httpx.post(f"{base}/anthropic/models/claude-test:predict", headers={"x-api-key": KEY},
                          json={"messages": HI})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert "rawPredict" in response.json()["error"]["message"]
    response = httpx.post(f"{base}/anthropic/models/claude-test:rawPredict", headers={"x-api-key": "sk-wrong"},
                          json={"anthropic_version": "vertex-2023-10-16", "messages": HI})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert not mock.requests
