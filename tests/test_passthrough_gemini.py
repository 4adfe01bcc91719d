"""The native Gemini passthrough (/api/google/gemini/..., spec 2.2): Google's official `google-genai`
SDK and plain HTTP against a real gateway process, tests/mock_gemini.py, and tests/mock_vertex.py
for X-Respan-Route-Provider: vertex_ai."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from google import genai
from google.genai import errors, types

from proxy.call import Call
from proxy.endpoints.gemini import json_array, read_call
from proxy.errors import GatewayError
from proxy.estimate import prompt_tokens
from proxy.params import EMPTY
from proxy.providers.gemini import native_body
from proxy.sse_gemini import GeminiStreamTap
from tests.conftest import KEY, GatewayProcess, module_gateway, server_fixtures
from tests.mock_gemini import ANSWER, COUNT_TOKENS, EMBEDDING, WORDS, MockGemini
from tests.mock_vertex import MockVertex
from tests.test_provider_vertex import serving_vertex

PRICES = {"input": 2.0, "output": 10.0, "cached_input": 0.5}
# mock_gemini.USAGE: 12 prompt tokens (4 of them cached), 6 output tokens
COST = ((12 - 4) * 2.0 + 4 * 0.5 + 6 * 10.0) / 1e6
GEMINI_KEY = "gm-upstream-secret-key"
HELLO = "Say hello"

gmock_server, gmock = server_fixtures(MockGemini, "gmock_server", "gmock")


@pytest.fixture(scope="module")
def vmock(tmp_path_factory) -> Iterator[tuple[MockVertex, dict[str, str]]]:
    yield from serving_vertex(tmp_path_factory.mktemp("vertex-keys"))


@pytest.fixture(scope="module")
def gw(mock_upstream, gmock_server, vmock, tmp_path_factory) -> Iterator[GatewayProcess]:
    vertex, env = vmock
    model = {"provider": "gemini", "prices": PRICES}
    yield from module_gateway(
        tmp_path_factory, "gateway-gemini-passthrough", mock_upstream, env=env,
        pipeline=["auth", "routing", "fallback"],
        extra_providers=[
            {"id": "gemini", "protocol": "gemini", "base_url": gmock_server.base_url, "api_key": GEMINI_KEY},
            {"id": "vertex", "protocol": "vertex_ai", "api_key": "${VERTEX_SA_JSON}",
             "base_url": f"{vertex.base_url}/v1/projects/proj-test/locations/us-central1"},
        ],
        extra_models=[
            {"name": "gem", "model": "gm-text", **model},
            {"name": "gem-tools", "model": "gm-tools", **model},
            {"name": "gem-broken", "model": "gm-stream-error", **model},
            {"name": "gem-error-first", "model": "gm-stream-error-first", **model},
            {"name": "gem-cut", "model": "gm-cut", **model},
            {"name": "gem-bad", "model": "gm-status-400", **model},
            {"name": "gem-embed", "model": "gm-embed", **model},
            {"name": "gem-small", "model": "gm-small-window", "context_window": 50, **model},
        ],
    )


CLIENTS: list[genai.Client] = []  # a Client closes its connections when it is collected: keep them


def client(gw: GatewayProcess, headers: dict[str, str] | None = None, key: str = KEY) -> genai.Client:
    options = types.HttpOptions(base_url=f"{gw.url}/api/google/gemini", headers=headers,
                                retry_options=types.HttpRetryOptions(attempts=1))
    CLIENTS.append(genai.Client(api_key=key, http_options=options))
    return CLIENTS[-1]


def params_header(**params: Any) -> dict[str, str]:
    return {"X-Data-Respan-Params": base64.b64encode(orjson.dumps(params)).decode()}


def url(gw: GatewayProcess, model: str, method: str) -> str:
    return f"{gw.url}/api/google/gemini/v1beta/models/{model}:{method}"


BODY = {"contents": [{"role": "user", "parts": [{"text": HELLO}]}]}


# -- the SDK end to end ------------------------------------------------------------------------


def test_generate_content(gw, gmock):
    response = client(gw).models.generate_content(
        model="gem", contents=HELLO,
        config=types.GenerateContentConfig(
            system_instruction="Be brief.", temperature=0.3,
            http_options=types.HttpOptions(extra_body={"respan_params": {
                "customer_identifier": "gm-cust", "metadata": {"team": "maps"}}})))
    assert response.text == ANSWER
    assert response.usage_metadata.prompt_token_count == 12 and response.usage_metadata.candidates_token_count == 6
    sent = gmock.last()
    assert sent["path"] == "/v1beta/models/gm-text:generateContent"
    assert sent["headers"]["x-goog-api-key"] == GEMINI_KEY  # the provider's key, never the client's
    assert "respan_params" not in sent["body"]
    assert sent["body"]["systemInstruction"]["parts"][0]["text"] == "Be brief."
    assert sent["body"]["generationConfig"]["temperature"] == 0.3
    record = gw.records(count=1, where="customer_identifier = ?", args=("gm-cust",))[-1]
    assert record["log_type"] == "chat" and record["status_code"] == 200 and record["provider_id"] == "gemini"
    assert record["model"] == "gm-text-001" and record["model_requested"] == "gem"
    assert record["prompt_tokens"] == 12 and record["completion_tokens"] == 6
    assert record["prompt_cache_hit_tokens"] == 4
    assert record["cost"] == pytest.approx(COST)
    assert record["metadata"] == {"team": "maps"}
    assert record["prompt_messages"] == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": HELLO}]
    assert record["completion_message"]["content"] == ANSWER


def test_bytes_whole_unchanged_and_cost_header(gw, gmock):
    response = httpx.post(url(gw, "gem", "generateContent"), headers={"x-goog-api-key": KEY}, json=BODY)
    assert response.status_code == 200
    assert response.content == orjson.dumps(MockGemini.whole(BODY, "gm-text"))
    assert float(response.headers["x-llmrelay-cost"]) == pytest.approx(COST)
    assert response.headers["x-llmrelay-provider"] == "gemini"


def test_stream(gw, gmock):
    chunks = list(client(gw).models.generate_content_stream(model="gem", contents=HELLO))
    assert "".join(c.text or "" for c in chunks) == ANSWER
    assert chunks[-1].usage_metadata.candidates_token_count == 6
    assert gmock.last()["path"] == "/v1beta/models/gm-text:streamGenerateContent"
    assert gmock.last()["query"] == {"alt": "sse"}
    with httpx.stream("POST", url(gw, "gem", "streamGenerateContent") + "?alt=sse",
                      headers={"x-goog-api-key": KEY}, json=BODY) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join(response.iter_bytes())
        log_id = response.headers["x-respan-log-id"]
    assert body.endswith(b"\r\n\r\n") and body.count(b"data: ") == len(WORDS)  # Google's events, as they came
    record = gw.record(log_id)
    assert record["stream"] and record["status_code"] == 200
    assert record["prompt_tokens"] == 12 and record["completion_tokens"] == 6
    assert record["cost"] == pytest.approx(COST)
    assert record["time_to_first_token"] is not None
    assert record["completion_message"]["content"] == ANSWER


def test_stream_as_json_array_without_alt_sse(gw, gmock):
    with httpx.stream("POST", url(gw, "gem", "streamGenerateContent"), headers={"x-goog-api-key": KEY},
                      json=BODY) as response:
        assert response.headers["content-type"].startswith("application/json")
        pieces = list(response.iter_bytes())
    items = orjson.loads(b"".join(pieces))
    assert [item["candidates"][0]["content"]["parts"][0]["text"] for item in items] == WORDS
    assert gmock.last()["query"] == {"alt": "sse"}  # upstream, the gateway always asks for SSE


def test_tools(gw, gmock):
    weather = types.FunctionDeclaration(name="get_weather", parameters_json_schema={
        "type": "object", "properties": {"city": {"type": "string"}}})
    response = client(gw).models.generate_content(
        model="gem-tools", contents="Weather in Paris?",
        config=types.GenerateContentConfig(tools=[types.Tool(function_declarations=[weather])]))
    calls = response.function_calls
    assert [(c.name, c.args) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert gmock.last()["body"]["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    record = gw.records(count=1, where="model_requested = ?", args=("gem-tools",))[-1]
    assert [c["function"]["name"] for c in record["tool_calls"]] == ["get_weather", "get_time"]


def test_error_inside_a_stream(gw, gmock):
    with pytest.raises(errors.APIError) as caught:
        for _ in client(gw).models.generate_content_stream(model="gem-broken", contents=HELLO):
            pass
    assert caught.value.code == 503
    record = gw.records(count=1, where="model_requested = ?", args=("gem-broken",))[-1]
    assert record["status_code"] == 503 and "overloaded" in record["error_message"]
    assert record["prompt_tokens"] == 12  # the usage seen before the error


def test_cut_stream_ends_with_an_error_event(gw, gmock):
    with httpx.stream("POST", url(gw, "gem-cut", "streamGenerateContent") + "?alt=sse",
                      headers={"x-goog-api-key": KEY}, json=BODY) as response:
        body = b"".join(response.iter_bytes())
        log_id = response.headers["x-respan-log-id"]
    last = body.rstrip().rsplit(b"data: ", 1)[1]
    assert orjson.loads(last)["error"]["code"] == 502
    record = gw.record(log_id)
    assert record["status_code"] == 502 and record["error_message"]
    with pytest.raises(errors.APIError):
        for _ in client(gw).models.generate_content_stream(model="gem-cut", contents=HELLO):
            pass


def test_stream_error_first_falls_back(gw, gmock):
    c = client(gw, headers=params_header(fallback_models=["gem"]))
    chunks = list(c.models.generate_content_stream(model="gem-error-first", contents=HELLO))
    assert "".join(ch.text or "" for ch in chunks) == ANSWER
    assert [r["model"] for r in gmock.requests] == ["gm-stream-error-first", "gm-text"]
    record = gw.records(count=1, where="model_requested = ?", args=("gem-error-first",))[-1]
    assert record["fallback"] and record["status_code"] == 200


def test_upstream_error_in_googles_shape(gw, gmock):
    with pytest.raises(errors.ClientError) as caught:
        client(gw).models.generate_content(model="gem-bad", contents=HELLO)
    assert caught.value.code == 400 and caught.value.status == "INVALID_ARGUMENT"
    response = httpx.post(url(gw, "gem-bad", "generateContent"), headers={"x-goog-api-key": KEY}, json=BODY)
    assert response.json()["error"]["details"][0]["reason"] == "MOCK"  # Google's body, as it came


@pytest.mark.parametrize(("path", "headers", "body", "status", "google_status", "says"), [
    ("gem:generateContent", {"x-goog-api-key": "sk-wrong"}, BODY, 401, "UNAUTHENTICATED", "API key"),
    ("no-such-model:generateContent", {"x-goog-api-key": KEY}, BODY, 404, "NOT_FOUND", "no-such-model"),
    ("gem:predictLongRunning", {"x-goog-api-key": KEY}, BODY, 404, "NOT_FOUND", "generateContent"),
    ("gem:generateContent", {"x-goog-api-key": KEY}, b"{not json", 400, "INVALID_ARGUMENT", "not valid JSON"),
    ("gpt-test:generateContent", {"x-goog-api-key": KEY}, BODY, 400, "INVALID_ARGUMENT", "'mock'"),
])
def test_gateway_errors_in_googles_shape(gw, gmock, path, headers, body, status, google_status, says):
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = httpx.post(f"{gw.url}/api/google/gemini/v1beta/models/{path}", headers=headers, content=content)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["status"] == google_status and says in error["message"]
    assert not gmock.requests


def test_key_in_the_query_and_method_not_allowed(gw, gmock):
    response = httpx.post(url(gw, "gem", "generateContent") + f"?key={KEY}", json=BODY)
    assert response.status_code == 200 and response.json()["candidates"]
    assert gmock.last()["query"] == {}  # the gateway key never travels upstream
    assert httpx.get(url(gw, "gem", "generateContent"), headers={"x-goog-api-key": KEY}).status_code == 405


def test_count_tokens(gw, gmock):
    result = client(gw).models.count_tokens(model="gem", contents=HELLO)
    assert result.total_tokens == COUNT_TOKENS
    assert gmock.last()["path"] == "/v1beta/models/gm-text:countTokens"
    record = gw.records(count=1, where="log_type = ?", args=("count_tokens",))[-1]
    assert record["prompt_tokens"] == COUNT_TOKENS and record["cost"] == 0 and record["status_code"] == 200


def test_embeddings(gw, gmock):
    result = client(gw).models.embed_content(model="gem-embed", contents=["first text", "second text!"])
    assert [e.values for e in result.embeddings] == [EMBEDDING, EMBEDDING]
    sent = gmock.last()
    assert sent["path"] == "/v1beta/models/gm-embed:batchEmbedContents"
    # the alias was routed: every nested request names the upstream model (the mock checks it too)
    assert {r["model"] for r in sent["body"]["requests"]} == {"models/gm-embed"}
    record = gw.records(count=1, where="log_type = ?", args=("embedding",))[-1]
    assert record["prompt_tokens"] == 6  # no usage from Gemini: 22 characters, about 4 a token
    assert record["cost"] == pytest.approx(6 * 2.0 / 1e6)
    assert "usage estimated" in record["warnings"][0]


def test_route_provider_vertex(gw, gmock, vmock):
    vertex, _ = vmock
    vertex.reset()
    c = client(gw, headers={"X-Respan-Route-Provider": "vertex_ai"})
    assert c.models.generate_content(model="gem", contents=HELLO).text == ANSWER
    assert "".join(ch.text or "" for ch in c.models.generate_content_stream(model="gem", contents=HELLO)) == ANSWER
    assert c.models.count_tokens(model="gem", contents=HELLO).total_tokens == COUNT_TOKENS
    assert [(r["publisher"], r["model"], r["method"]) for r in vertex.requests] == [
        ("google", "gm-text", "generateContent"), ("google", "gm-text", "streamGenerateContent"),
        ("google", "gm-text", "countTokens")]
    assert vertex.requests[1]["query"] == {"alt": "sse"}
    assert vertex.requests[0]["headers"]["Authorization"].startswith("Bearer ya29.mock-")
    assert not gmock.requests
    with pytest.raises(errors.ClientError) as caught:  # Vertex AI embeds through another API
        c.models.embed_content(model="gem-embed", contents=["x"])
    assert caught.value.code == 400 and "gemini.batchEmbedContents" in caught.value.message
    # two chat records (generateContent and its stream; countTokens and the refused embedding are not
    # chat): waiting for a third only ran out the 5 s wait
    rows = gw.records(count=2, where="provider_id = ? AND log_type = ? AND model_requested = ?",
                      args=("vertex", "chat", "gem"))
    assert len(rows) == 2 and rows[-1]["cost"] > 0


def test_disable_log(gw, gmock):
    client(gw, headers=params_header(disable_log=True, customer_identifier="gm-private")).models.generate_content(
        model="gem", contents="a secret prompt")
    record = gw.records(count=1, where="customer_identifier = ?", args=("gm-private",))[-1]
    assert record["prompt_messages"] is None and record["completion_message"] is None
    assert record["prompt_tokens"] == 12


def test_cost_in_metrics(gw, gmock):
    client(gw).models.generate_content(model="gem", contents=HELLO)
    text = httpx.get(f"{gw.url}/metrics").text
    line = next(x for x in text.splitlines()
                if x.startswith("llmrelay_cost_usd_total{") and 'provider="gemini"' in x)
    assert float(line.rsplit(" ", 1)[1]) >= COST


# -- units ---------------------------------------------------------------------------------------


def _call(path: str, query: str = "", headers: dict[str, str] | None = None) -> Call:
    return Call(endpoint="gemini", path=path, body={}, params=EMPTY, headers=headers or {}, client_format="gemini",
                query=query)


def test_read_call():
    call = _call("/api/google/gemini/v1beta/models/gemini/gm-x:streamGenerateContent", "alt=sse&key=k1")
    read_call(call, orjson.dumps({**BODY, "respan_params": {"customer_identifier": "c"}}))
    assert call.model == "gemini/gm-x" and call.stream and call.body == BODY
    assert call.params.customer_identifier == "c" and call.headers["x-goog-api-key"] == "k1"
    call = _call("/api/google/gemini/v1/models/m:countTokens", headers={"authorization": "Bearer k2"})
    read_call(call, orjson.dumps(BODY))
    assert not call.stream and "x-goog-api-key" not in call.headers
    for path in ("/api/google/gemini/v1beta/models/m", "/api/google/gemini/v2/models/m:generateContent",
                 "/api/google/gemini/v1beta/files/f:generateContent"):
        with pytest.raises(GatewayError) as caught:
            read_call(_call(path), orjson.dumps(BODY))
        assert caught.value.status == 404


def test_native_body_renames_nested_models():
    body = {"requests": [{"model": "models/alias", "content": {"parts": [{"text": "a"}]}}, {"content": {}}]}
    assert native_body(body, "up", "models/up")["requests"] == [
        {"content": {"parts": [{"text": "a"}]}, "model": "models/up"}, {"content": {}}]
    assert native_body({"generateContentRequest": {"model": "models/x", **BODY}}, "up", None) == {
        "generateContentRequest": BODY}
    assert native_body(BODY, "up", "models/up") is BODY  # nothing nested: the very same body


def test_tap_passes_bytes_unchanged():
    mock_events = [b'data: {"candidates":[{"content":{"parts":[{"text":"Hi"}]}}],"modelVersion":"g-1",'
                   b'"usageMetadata":{"promptTokenCount":3}}\r\n\r\n',
                   b'data: {"candidates":[{"content":{"parts":[{"text":" there"}]},"finishReason":"STOP"}],'
                   b'"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"thoughtsTokenCount":5}}\r\n\r\n']
    data = b"".join(mock_events)
    tap = GeminiStreamTap()
    for i in range(0, len(data), 7):
        chunk = data[i:i + 7]
        assert tap.feed(chunk) is chunk
    tap.flush()
    assert tap.done and tap.model == "g-1" and tap.saw_content
    usage = tap.final_usage()
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 7)
    assert tap.messages() == [{"role": "assistant", "content": "Hi there", "finish_reason": "STOP"}]


def test_json_array_reframes_split_events():
    async def events() -> Any:
        data = b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\ndata: {"c":3}\r\n\r\n'
        for i in range(0, len(data), 5):
            yield data[i:i + 5]

    async def collect() -> list[bytes]:
        return [piece async for piece in json_array(events())]

    pieces = asyncio.run(collect())
    assert orjson.loads(b"".join(pieces)) == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert len(pieces) > 2  # written as the events came, not at the end


def test_prompt_estimate_reads_gemini_and_anthropic_bodies():
    assert prompt_tokens({"contents": [{"parts": [{"text": "x" * 40}]}],
                          "systemInstruction": {"parts": [{"text": "y" * 8}]}}) == 12
    assert prompt_tokens({"system": "s" * 8, "messages": [{"role": "user", "content": "u" * 8}]}) == 4
    assert prompt_tokens({"requests": [{"content": {"parts": [{"text": "z" * 12}]}}]}) == 3


def test_vertex_passthrough_with_google_genai_vertex_mode(gw, gmock, vmock):
    vertex, _ = vmock
    vertex.reset()
    options = types.HttpOptions(base_url=f"{gw.url}/api/google/vertexai", api_version="v1",
                                retry_options=types.HttpRetryOptions(attempts=1))
    CLIENTS.append(genai.Client(vertexai=True, api_key=KEY, http_options=options))
    c = CLIENTS[-1]
    assert c.models.generate_content(model="gemini-2.5-flash", contents=HELLO).text == ANSWER
    chunks = list(c.models.generate_content_stream(model="gemini-2.5-flash", contents=HELLO))
    assert "".join(ch.text or "" for ch in chunks) == ANSWER
    assert [(r["publisher"], r["model"], r["method"]) for r in vertex.requests] == [
        ("google", "gemini-2.5-flash", "generateContent"), ("google", "gemini-2.5-flash", "streamGenerateContent")]
    assert not gmock.requests  # gemini-2.5-flash on the gemini provider would be the mock's gm-* models only
    record = gw.records(count=2, where="provider_id = ? AND model_requested = ?",
                        args=("vertex", "gemini-2.5-flash"))[-1]
    # Vertex AI's catalog prices for gemini-2.5-flash: 0.30 / 2.50, 0.03 cached
    assert record["cost"] == pytest.approx(((12 - 4) * 0.30 + 4 * 0.03 + 6 * 2.50) / 1e6)
    response = httpx.post(f"{gw.url}/api/google/vertexai/v1/publishers/google/models/gemini-2.5-flash:predict",
                          headers={"x-goog-api-key": KEY}, json=BODY)
    assert response.status_code == 404 and response.json()["error"]["status"] == "NOT_FOUND"


def test_context_window_skips_a_model_the_prompt_does_not_fit(gw, gmock):
    c = client(gw, headers=params_header(fallback_models=["gem"], customer_identifier="gm-window"))
    assert c.models.generate_content(model="gem-small", contents="word " * 100).text == ANSWER  # ~125 tokens
    assert [r["model"] for r in gmock.requests] == ["gm-text"]  # gm-small-window was never called
    record = gw.records(count=1, where="customer_identifier = ?", args=("gm-window",))[-1]
    assert "exceeds its context window of 50" in record["warnings"][0]


def test_public_models_know_windows_and_native_provider_names(gw):
    by_name = {m["model_name"]: m for m in httpx.get(f"{gw.url}/api/models/public").json()["models"]}
    assert by_name["gem-small"]["max_context_window"] == 50  # configured
    assert by_name["gem"]["provider"]["provider_name"] == "Google Gemini"
    vertex = by_name["vertex_ai/claude-sonnet-4-5@20250929"]  # a catalog model of the provider `vertex`
    assert vertex["provider"] == {"provider_name": "Google Vertex AI", "provider_id": "vertex",
                                  "moderation": "Unfiltered", "credential_fields": [
                                      "vertex_ai_project", "vertex_ai_location", "vertex_ai_credentials"]}
    assert (vertex["input_cost"], vertex["output_cost"], vertex["max_context_window"]) == (3.0, 15.0, 200000)
