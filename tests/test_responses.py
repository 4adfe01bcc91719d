"""POST /api/responses (and /api/v1, /v1): the official `openai` SDK's `client.responses.create`
through a real gateway process in front of the mock's Responses routes (tests/mock_upstream.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from proxy.sse_responses import ResponsesStreamTap
from tests.conftest import KEY, GatewayProcess, azure_url, module_gateway
from tests.conftest import openai_client as client
from tests.mock_upstream import RESPONSES_USAGE, WORDS, MockUpstream

PRICES = {"input": 2.0, "output": 8.0, "cached_input": 0.5}
TEXT = "".join(WORDS)


def expected_cost() -> float:
    cached = RESPONSES_USAGE["input_tokens_details"]["cached_tokens"]
    uncached = RESPONSES_USAGE["input_tokens"] - cached
    return (uncached * 2.0 + cached * 0.5 + RESPONSES_USAGE["output_tokens"] * 8.0) / 1e6


@pytest.fixture(scope="module")
def gw(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = mock_upstream.root_url
    yield from module_gateway(
        tmp_path_factory, "responses", mock_upstream,
        pipeline=["auth", "routing", "credentials", "fallback"],
        models=[
            {"name": "resp", "provider": "mock", "model": "mock-resp", "prices": PRICES},
            {"name": "resp-down", "provider": "mock", "model": "mock-status-503"},
            {"name": "resp-cut", "provider": "mock", "model": "mock-cut-3"},
            {"name": "resp-failed", "provider": "mock", "model": "mock-stream-error-500"},
            {"name": "resp-failed-late", "provider": "mock", "model": "mock-stream-late-error-500"},
            {"name": "resp-azure", "provider": "azure", "model": "resp-deployment", "prices": PRICES},
            {"name": "claude-resp", "provider": "anthropic", "model": "claude-x"},
        ],
        extra_providers=[
            {"id": "azure", "protocol": "azure", "base_url": root, "api_key": "az-key",
             "api_version": "2025-04-01-preview"},
            {"id": "anthropic", "protocol": "anthropic", "base_url": root, "api_key": "an-key"},
        ],
    )


@pytest.mark.parametrize("prefix", ["/api", "/api/v1", "/v1"])
def test_non_stream(gw, mock, prefix):
    raw = client(gw, prefix).responses.with_raw_response.create(model="resp", input="Say hi")
    response = raw.parse()
    assert response.output_text == TEXT
    assert response.usage.input_tokens == 13 and response.usage.output_tokens == 9
    assert response.usage.input_tokens_details.cached_tokens == 3
    assert mock.last()["path"] == "/v1/responses"
    assert mock.last()["body"] == {"model": "mock-resp", "input": "Say hi"}
    assert raw.headers["x-llmrelay-provider"] == "mock"
    assert float(raw.headers["x-llmrelay-cost"]) == pytest.approx(expected_cost())


def test_openais_own_stored_prompt_goes_upstream(gw, mock):
    """On /responses, `prompt: {"id": "pmpt_..."}` is OpenAI's stored prompt, not the gateway's
    `prompt` param (which names `prompt_id`): it is forwarded as it came."""
    own = {"id": "pmpt_123", "version": "2", "variables": {"city": "Paris"}}
    client(gw).responses.create(model="resp", input="Say hi", prompt=own)
    assert mock.last()["body"]["prompt"] == own


def test_usage_cost_log_and_gateway_params_stripped(gw, mock):
    raw = client(gw).responses.with_raw_response.create(
        model="resp", input=[{"role": "user", "content": "Hello"}], instructions="Be brief", max_output_tokens=50,
        extra_body={"customer_identifier": "cust-1", "metadata": {"k": "v"}, "fallback_models": ["resp"]},
        extra_headers={"X-Data-Respan-Params": orjson.dumps({"thread_identifier": "th-1"}).decode()},
    )
    assert raw.parse().output_text == TEXT
    assert mock.last()["body"] == {"model": "mock-resp", "input": [{"role": "user", "content": "Hello"}],
                                   "instructions": "Be brief", "max_output_tokens": 50}
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["log_type"] == "response"
    assert record["request_url_path"] == "/api/responses"
    assert record["status_code"] == 200 and record["status"] == "success"
    assert record["prompt_tokens"] == 13 and record["completion_tokens"] == 9
    assert record["prompt_cache_hit_tokens"] == 3
    assert record["cost"] == pytest.approx(expected_cost())
    assert record["customer_identifier"] == "cust-1"
    assert record["thread_identifier"] == "th-1"
    assert record["prompt_messages"] == [{"role": "system", "content": "Be brief"},
                                         {"role": "user", "content": "Hello"}]
    assert record["completion_message"]["content"] == TEXT
    assert record["model"] == "mock-resp"


def test_stream(gw, mock):
    events = list(client(gw).responses.create(model="resp", input="Say hi", stream=True,
                                               extra_body={"customer_identifier": "cust-s"}))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == TEXT
    completed = events[-1].response
    assert completed.usage.input_tokens == 13 and completed.usage.output_tokens == 9
    sent = mock.last()["body"]
    assert sent == {"model": "mock-resp", "input": "Say hi", "stream": True}  # no stream_options added
    record = gw.records(where="customer_identifier = ?", args=("cust-s",))[0]
    assert record["log_type"] == "response" and record["stream"]
    assert record["prompt_tokens"] == 13 and record["completion_tokens"] == 9
    assert record["cost"] == pytest.approx(expected_cost())
    assert record["completion_message"]["content"] == TEXT
    assert record["status_code"] == 200


def test_stream_bytes_pass_through(gw, mock):
    with httpx.stream("POST", f"{gw.url}/api/responses", json={"model": "resp", "input": "x", "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        body = b"".join(response.iter_bytes())
    assert response.status_code == 200
    assert body.startswith(b"event: response.created\ndata: ")
    assert body.endswith(b"\n\n") and b"event: response.completed" in body
    assert b"[DONE]" not in body


def test_stream_cut_ends_with_an_error_event(gw, mock):
    with httpx.stream("POST", f"{gw.url}/api/responses",
                      json={"model": "resp-cut", "input": "x", "stream": True, "customer_identifier": "cust-cut"},
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        body = b"".join(response.iter_bytes())
    assert body.count(b"response.output_text.delta") == 6  # 3 events: name + type each
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = orjson.loads(last.split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["code"] == "server_error" and error["sequence_number"] == 4
    record = gw.records(where="customer_identifier = ?", args=("cust-cut",))[0]
    assert record["status_code"] == 502 and record["status"] == "error"
    assert record["completion_tokens"] == 3


def test_stream_failed_before_any_output_is_an_error_reply(gw, mock):
    """response.created then response.failed: nothing was worth sending, so the client gets the
    failure as an error reply (after the retries and fallbacks it allows), as for chat streams."""
    with pytest.raises(openai.InternalServerError) as info:
        list(client(gw).responses.create(model="resp-failed", input="x", stream=True, extra_body={
            "customer_identifier": "cust-failed", "retry_params": {"retry_enabled": False}}))
    assert info.value.body["message"] == "mock failure" and info.value.body["code"] == "server_error"
    record = gw.records(where="customer_identifier = ?", args=("cust-failed",))[0]
    assert record["status_code"] == 500 and "mock failure" in record["error_message"]


def test_stream_failed_before_any_output_falls_back(gw, mock):
    events = list(client(gw).responses.create(model="resp-failed", input="x", stream=True, extra_body={
        "fallback_models": ["resp"], "retry_params": {"retry_enabled": False}}))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == TEXT
    assert mock.count("mock-stream-error-500") == 1 and mock.count("mock-resp") == 1


def test_stream_failed_after_output_is_relayed(gw, mock):
    """Once output went out, a response.failed is the stream's own end: relayed, and logged as an error."""
    events = list(client(gw).responses.create(model="resp-failed-late", input="x", stream=True,
                                               extra_body={"customer_identifier": "cust-failed-late"}))
    assert events[-1].type == "response.failed"
    assert any(e.type == "response.output_text.delta" for e in events)
    record = gw.records(where="customer_identifier = ?", args=("cust-failed-late",))[0]
    assert record["status_code"] == 500 and "mock failure" in record["error_message"]


def test_fallback_on_503(gw, mock):
    raw = client(gw).responses.with_raw_response.create(
        model="resp-down", input="hi",
        extra_body={"fallback_models": ["resp"], "retry_params": {"num_retries": 1, "retry_after": 0.01}},
    )
    assert raw.parse().output_text == TEXT
    assert raw.headers["x-llmrelay-model"] == "mock-resp"
    assert mock.count("mock-status-503") >= 1 and mock.count("mock-resp") == 1
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["fallback"] is True and record["log_type"] == "response"


def test_upstream_error_passes_through(gw, mock):
    with pytest.raises(openai.APIStatusError) as exc:
        client(gw).responses.create(model="resp-down", input="hi")
    assert exc.value.status_code == 503
    assert "mock upstream error 503" in exc.value.message


def test_azure_url(gw, mock):
    raw = client(gw).responses.with_raw_response.create(model="resp-azure", input="hi")
    assert raw.parse().output_text == TEXT
    sent = mock.last()
    assert sent["path"] == "/openai/responses"
    assert sent["query"] == {"api-version": "2025-04-01-preview"}
    assert sent["headers"]["api-key"] == "az-key"
    assert sent["body"]["model"] == "resp-deployment"  # the deployment travels as the model
    assert float(raw.headers["x-llmrelay-cost"]) == pytest.approx(expected_cost())


def _azure_url(base_url: str, api_version: str | None = None) -> str:
    return azure_url("responses", base_url, api_version)


def test_azure_url_shapes():
    res = "https://res.openai.azure.com"
    assert _azure_url(res) == f"{res}/openai/responses?api-version=2025-04-01-preview"
    assert _azure_url(res + "/openai", "2025-03-01-preview") == f"{res}/openai/responses?api-version=2025-03-01-preview"
    assert _azure_url(res, "v1") == f"{res}/openai/v1/responses"
    assert _azure_url(res + "/openai/v1") == f"{res}/openai/v1/responses"
    assert _azure_url(f"{res}/openai/deployments/fixed/chat/completions?api-version=2025-04-01-preview") == (
        f"{res}/openai/responses?api-version=2025-04-01-preview")


def test_non_openai_provider_is_400(gw, mock):
    with pytest.raises(openai.BadRequestError) as exc:
        client(gw).responses.create(model="claude-resp", input="hi")
    assert "does not serve responses" in exc.value.response.text
    assert mock.requests == []


def test_model_required_and_auth(gw, mock):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{gw.url}/api/responses", json={"input": "hi"}, headers=headers).status_code == 400
    assert httpx.post(f"{gw.url}/api/responses", json={"model": "resp", "input": "hi"},
                      headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{gw.url}/api/responses").status_code == 405
    assert mock.requests == []


def test_tap_reads_split_events():
    tap = ResponsesStreamTap()
    events = [
        {"type": "response.created", "sequence_number": 0, "response": {"model": "m-1", "usage": None}},
        {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hel"},
        {"type": "response.output_text.delta", "sequence_number": 2, "delta": "lo"},
        {"type": "response.completed", "sequence_number": 3, "response": {"model": "m-1", "output": [], "usage": {
            "input_tokens": 4, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}},
    ]
    raw = b"".join(f"event: {e['type']}\n".encode() + b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    for i in range(0, len(raw), 7):
        assert tap.feed(raw[i:i + 7]) == raw[i:i + 7]
    tap.flush()
    assert tap.done and tap.model == "m-1" and tap.error is None
    usage = tap.final_usage()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (4, 2, 1)
    assert tap.messages() == [{"role": "assistant", "content": "Hello"}]
