"""End to end: POST /api/chat/completions (non-stream), model resolution, errors, model lists.

The gateway runs as a process on the standard test config; the provider is the mock; the client
is the official `openai` SDK or plain httpx.
"""

from __future__ import annotations

import base64

import httpx
import openai
import orjson
import pytest
from openai import OpenAI

from tests.conftest import KEY, UPSTREAM_KEY, base_config
from tests.mock_upstream import WORDS

ANSWER = "".join(WORDS)
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hi"}]


def client(gateway, path: str = "/api") -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}{path}", api_key=KEY, max_retries=0)


def post(gateway, body, path: str = "/api/chat/completions", **kwargs) -> httpx.Response:
    if isinstance(body, dict | list):
        kwargs["content"] = orjson.dumps(body)
    else:
        kwargs["content"] = body
    headers = {**AUTH, "Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{gateway.url}{path}", headers=headers, timeout=10, **kwargs)


# -- the answer --------------------------------------------------------------------------------


def test_non_stream_answer_usage_headers_and_upstream_request(gateway, mock):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HI, temperature=0.3, max_tokens=50,
        extra_body={"customer_identifier": "cust-1", "metadata": {"k": "v"}},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "mock-ok"  # the served model, as the provider reports it
    assert completion.usage.prompt_tokens == 11
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == 18
    assert completion.usage.prompt_tokens_details.cached_tokens == 2

    # what reached the provider: the upstream model name, the OpenAI fields, the provider key
    assert len(mock.requests) == 1
    upstream = mock.last()
    assert upstream["path"] == "/v1/chat/completions"
    assert upstream["body"] == {"model": "mock-ok", "messages": HI, "temperature": 0.3, "max_tokens": 50}
    assert upstream["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY not in str(upstream["headers"])

    log_id = raw.headers["x-respan-log-id"]
    request_id = raw.headers["x-respan-gateway-request-id"]
    assert len(log_id) == 32 and int(log_id, 16) >= 0
    assert len(request_id) == 32 and int(request_id, 16) >= 0 and request_id != log_id
    overhead = float(raw.headers["x-llmrelay-overhead-ms"])
    assert 0 <= overhead < 5000

    record = gateway.record(log_id)
    assert record["gateway_request_id"] == request_id
    assert record["status_code"] == 200
    assert record["status"] == "success"
    assert record["error_message"] == ""
    assert record["stream"] is False
    assert record["model"] == "mock-ok"
    assert record["model_requested"] == "gpt-test"
    assert record["provider_id"] == "mock"
    assert record["request_url_path"] == "/api/chat/completions"
    assert (record["prompt_tokens"], record["completion_tokens"], record["total_request_tokens"]) == (11, 7, 18)
    assert record["prompt_cache_hit_tokens"] == 2
    # gpt-test prices: input 1.0, output 2.0, cached_input 0.5 per 1M: 9*1 + 2*0.5 + 7*2 = 24
    assert record["cost"] == pytest.approx(24 / 1e6)
    assert record["customer_identifier"] == "cust-1"
    assert record["metadata"] == {"k": "v"}
    assert record["prompt_messages"] == HI
    assert record["completion_message"] == {"role": "assistant", "content": ANSWER}
    assert record["temperature"] == 0.3
    assert record["max_tokens"] == 50
    assert record["key_name"] == "tests"
    assert record["latency"] > 0


@pytest.mark.parametrize("path", ["/api/chat/completions", "/api/v1/chat/completions", "/v1/chat/completions"])
def test_three_paths(gateway, mock, path):
    response = post(gateway, {"model": "gpt-test", "messages": HI}, path)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == ANSWER
    assert response.headers["content-type"].startswith("application/json")
    assert mock.last()["body"]["model"] == "mock-ok"
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["request_url_path"] == path
    assert record["status_code"] == 200


@pytest.mark.parametrize("path", ["/api/chat/completions", "/v1/chat/completions"])
def test_sdk_on_both_base_urls(gateway, mock, path):
    base = path.removesuffix("/chat/completions")
    completion = client(gateway, base).chat.completions.create(model="gpt-test", messages=HI)
    assert completion.choices[0].message.content == ANSWER


# -- model resolution --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "provider", "upstream_model"),
    [
        ("gpt-test", "mock", "mock-ok"),  # configured name
        ("gpt-test-alias", "mock", "mock-ok"),  # configured alias
        ("openai/mock-ok", "openai", "mock-ok"),  # provider/model slug on a configured provider
        ("mock/mock-other", "mock", "mock-other"),  # slug on a config-only provider
        ("mock-ok", "mock", "mock-ok"),  # bare upstream name of a configured model
    ],
)
def test_model_resolution(gateway, mock, requested, provider, upstream_model):
    raw = client(gateway).chat.completions.with_raw_response.create(model=requested, messages=HI)
    assert raw.parse().choices[0].message.content == ANSWER
    assert mock.last()["body"]["model"] == upstream_model
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["provider_id"] == provider
    assert record["model_requested"] == requested
    assert record["model"] == upstream_model


def test_unknown_model_is_404_with_spec_body(gateway, mock):
    response = post(gateway, {"model": "nope", "messages": HI})
    assert response.status_code == 404
    assert response.json() == {"detail": "Requested model nope is not available in the model list"}
    assert mock.requests == []
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 404
    assert record["error_message"] == "Requested model nope is not available in the model list"

    with pytest.raises(openai.NotFoundError) as info:
        client(gateway).chat.completions.create(model="nope", messages=HI)
    assert info.value.status_code == 404
    assert info.value.body == {"detail": "Requested model nope is not available in the model list"}


def test_unknown_provider_prefix_is_404(gateway, mock):
    response = post(gateway, {"model": "nosuchprovider/mock-ok", "messages": HI})
    assert response.status_code == 404
    assert response.json() == {
        "detail": "Requested model nosuchprovider/mock-ok is not available in the model list"
    }
    assert mock.requests == []


def test_missing_model_is_404(gateway, mock):
    response = post(gateway, {"messages": HI})
    assert response.status_code == 404
    assert response.json() == {"detail": "Requested model  is not available in the model list"}
    assert mock.requests == []


def test_model_of_wrong_type_is_422(gateway, mock):
    response = post(gateway, {"model": 5, "messages": HI})
    assert response.status_code == 422
    assert response.json() == {"detail": "Validation error", "errors": {"model": ["Expected `str`, got `int`"]}}
    assert mock.requests == []


# -- request shapes ----------------------------------------------------------------------------

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]
TOOL_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


def test_tool_calls(gateway, mock):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="mock/mock-tools", messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=TOOLS, tool_choice=TOOL_CHOICE, parallel_tool_calls=False,
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id == "call_1"
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}

    body = mock.last()["body"]
    assert body["model"] == "mock-tools"
    assert body["tools"] == TOOLS
    assert body["tool_choice"] == TOOL_CHOICE
    assert body["parallel_tool_calls"] is False

    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["tools"] == TOOLS
    assert record["tool_calls"] == [{"id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]


def test_tool_result_round_trip_is_forwarded_unchanged(gateway, mock):
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    completion = client(gateway).chat.completions.create(model="gpt-test", messages=messages, tools=TOOLS)
    assert completion.choices[0].message.content == ANSWER
    assert mock.last()["body"]["messages"] == messages


def test_image_content_parts_reach_the_provider_unchanged(gateway, mock):
    png = base64.b64encode(bytes(range(256)) * 40).decode()  # ~13.6 KB of base64, every byte value
    content = [
        {"type": "text", "text": "What is in these images? é 中文 \u2028"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png?x=1&y=%20"}},
    ]
    messages = [{"role": "user", "content": content}]
    completion = client(gateway).chat.completions.create(model="gpt-test", messages=messages)
    assert completion.choices[0].message.content == ANSWER
    received = mock.last()["body"]["messages"]
    assert received == messages
    assert received[0]["content"][1]["image_url"]["url"].encode() == f"data:image/png;base64,{png}".encode()


def test_n_greater_than_one(gateway, mock):
    raw = client(gateway).chat.completions.with_raw_response.create(model="gpt-test", messages=HI, n=2)
    completion = raw.parse()
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == [ANSWER, ANSWER]
    assert mock.last()["body"]["n"] == 2
    record = gateway.record(raw.headers["x-respan-log-id"])
    assert record["completion_messages"] == [{"role": "assistant", "content": ANSWER}] * 2


# -- bad requests ------------------------------------------------------------------------------


def test_malformed_json_is_400(gateway, mock):
    response = post(gateway, b'{"model": "gpt-test", "messages": [')
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("Invalid request format: the body is not valid JSON")
    assert set(response.json()) == {"detail"}
    assert mock.requests == []
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 400


def test_empty_body_is_400(gateway, mock):
    response = post(gateway, b"")
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid request format: the body is empty; expected a JSON object"}


@pytest.mark.parametrize(("body", "kind"), [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")])
def test_non_object_json_is_400(gateway, mock, body, kind):
    response = post(gateway, body)
    assert response.status_code == 400
    assert response.json() == {"detail": f"Invalid request format: expected a JSON object, got {kind}"}
    assert mock.requests == []


@pytest.mark.parametrize("messages", [None, "hi", {"role": "user"}])
def test_missing_or_bad_messages_is_400(gateway, mock, messages):
    body = {"model": "gpt-test"} if messages is None else {"model": "gpt-test", "messages": messages}
    response = post(gateway, body)
    assert response.status_code == 400
    assert response.json() == {"detail": "Invalid request format: `messages` is required and must be an array"}
    assert mock.requests == []


def test_body_over_limit_is_413(gateway, mock):
    big = "x" * (70 * 1024)  # max_body_bytes is 64 KiB in base_config
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": big}]})
    response = post(gateway, body)
    assert response.status_code == 413
    assert response.json() == {"detail": f"Request body of {len(body)} bytes is over the limit of 65536 bytes"}
    assert mock.requests == []
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 413


def test_chunked_body_over_limit_is_413(gateway, mock):
    def chunks():
        yield b'{"model": "gpt-test", "messages": [{"role": "user", "content": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'"}]}'

    response = httpx.post(f"{gateway.url}/api/chat/completions", headers=AUTH, content=chunks(), timeout=10)
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body is over the limit of 65536 bytes"}
    assert mock.requests == []


def test_body_just_under_limit_is_served(gateway, mock):
    envelope = len(orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": ""}]}))
    text = "y" * (64 * 1024 - envelope)
    response = post(gateway, {"model": "gpt-test", "messages": [{"role": "user", "content": text}]})
    assert len(response.request.content) == 64 * 1024
    assert response.status_code == 200, response.text
    assert mock.last()["body"]["messages"][0]["content"] == text


# -- upstream errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [(429, openai.RateLimitError), (500, openai.InternalServerError), (400, openai.BadRequestError)],
)
def test_upstream_error_is_passed_through(gateway, mock, status, exc_type):
    with pytest.raises(exc_type) as info:
        client(gateway).chat.completions.create(model=f"mock/mock-status-{status}", messages=HI)
    error = info.value
    assert error.status_code == status
    assert error.body == {"message": f"mock upstream error {status}", "type": "mock_error",
                          "param": None, "code": f"mock_{status}"}
    assert error.code == f"mock_{status}"
    assert error.response.headers["x-request-id"] == "req-mock"  # the provider's request id is passed on
    assert len(mock.requests) == 1  # max_retries=0 on the client, and the gateway did not retry either

    record = gateway.record(error.response.headers["x-respan-log-id"])
    assert record["status_code"] == status
    assert record["status"] == "error"
    assert record["error_message"] == f"{status}: mock upstream error {status}"
    assert record["model_requested"] == f"mock/mock-status-{status}"
    assert record["prompt_tokens"] == 0 and record["completion_tokens"] == 0
    assert record["cost"] == 0


def test_upstream_error_body_is_byte_identical(gateway, mock):
    response = post(gateway, {"model": "mock/mock-status-503", "messages": HI})
    assert response.status_code == 503
    assert response.json() == {"error": {"message": "mock upstream error 503", "type": "mock_error",
                                         "param": None, "code": "mock_503"}}


def test_connection_refused_is_502_naming_the_provider(gateway, mock):
    response = post(gateway, {"model": "down-model", "messages": HI})
    assert response.status_code == 502
    body = response.json()
    assert set(body) == {"detail"}
    detail = body["detail"]
    assert "'refused'" in detail
    assert "connection refused" in detail.lower()
    assert "/chat/completions" not in detail  # only the origin, never the path
    record = gateway.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 502
    assert record["error_message"] == detail
    assert record["provider_id"] == "refused"

    with pytest.raises(openai.APIStatusError) as info:
        client(gateway).chat.completions.create(model="down-model", messages=HI)
    assert info.value.status_code == 502


def test_connection_refused_never_leaks_the_upstream_key(start_gateway, tmp_path, mock, mock_upstream):
    secret = "sk-refused-provider-secret-9f8e7d6c5b4a"
    config = base_config(mock_upstream, tmp_path / "gw0")
    for provider in config["providers"]:
        if provider["id"] == "refused":
            provider["api_key"] = secret
            provider["base_url"] += f"?key={secret}"  # a key in the base URL's query must not leak either
    gateway = start_gateway(config=config)
    response = post(gateway, {"model": "down-model", "messages": HI})
    assert response.status_code == 502
    detail = response.json()["detail"]
    assert "'refused'" in detail and "connection refused" in detail.lower()
    assert secret not in response.text
    assert secret not in str(dict(response.headers))
    record = gateway.record(response.headers["x-respan-log-id"])
    assert secret not in orjson.dumps(record).decode()
    assert secret not in (gateway.workdir / "logs.jsonl").read_text()


# -- model lists, health, 404 --------------------------------------------------------------------


def test_public_models(gateway):
    response = httpx.get(f"{gateway.url}/api/models/public", timeout=5)  # no auth
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"models"}
    by_name = {m["model_name"]: m for m in data["models"]}
    for name in ("gpt-test", "gpt-test-alias"):
        model = by_name[name]
        assert model["input_cost"] == 1.0
        assert model["output_cost"] == 2.0
        assert model["provider"]["provider_id"] == "mock"
    assert by_name["down-model"]["provider"]["provider_id"] == "refused"
    # catalog models of the configured catalog provider (`openai`) are listed too, with their windows
    assert any(m["provider"]["provider_id"] == "openai" for m in data["models"])
    assert by_name["openai/gpt-4o"]["max_context_window"] == 128000
    assert by_name["openai/gpt-4o"]["provider"]["provider_name"] == "OpenAI"
    assert by_name["gpt-test"]["max_context_window"] is None  # configured without one, not in the catalog
    # catalog models of providers this gateway does not have are not
    assert not any(m["provider"]["provider_id"] == "groq" for m in data["models"])

    unnested = httpx.get(f"{gateway.url}/api/models/public", params={"unnest": "true"}, timeout=5)
    assert unnested.status_code == 200
    assert unnested.json() == data["models"]


def test_openai_models_list(gateway):
    page = client(gateway, "/v1").models.list()
    ids = [m.id for m in page.data]
    assert "gpt-test" in ids and "gpt-test-alias" in ids and "down-model" in ids
    assert len(ids) == len(set(ids))
    owners = {m.id: m.owned_by for m in page.data}
    assert owners["gpt-test"] == "mock"
    assert all(m.object == "model" and m.created > 0 for m in page.data)
    also = client(gateway, "/api/v1").models.list()
    assert [m.id for m in also.data] == ids


def test_health_check(gateway):
    for path in ("/api/health-check/", "/api/health-check"):
        response = httpx.get(f"{gateway.url}{path}", timeout=5)
        assert response.status_code == 200
        assert set(response.json()) == {"message"}
        assert isinstance(response.json()["message"], str)


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/api/nope"), ("GET", "/api/chat")])
def test_unknown_path_is_404(gateway, method, path):
    response = httpx.request(method, f"{gateway.url}{path}", headers=AUTH, timeout=5)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_wrong_method_is_405(gateway):
    response = httpx.get(f"{gateway.url}/api/chat/completions", headers=AUTH, timeout=5)
    assert response.status_code == 405
    assert response.json() == {"detail": 'Method "GET" not allowed.'}
