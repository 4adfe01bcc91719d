"""The Anthropic Messages adapter: OpenAI chat in, Anthropic upstream, OpenAI chat out.

End to end through a real gateway process against tests/mock_anthropic.py with the official
`openai` SDK as the client, plus fast unit tests of the translation functions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.call import Target
from proxy.errors import BadRequest
from proxy.providers.anthropic import (
    DROPPED_FIELDS,
    AnthropicMessages,
    StreamTranslator,
    error_reply_body,
    from_anthropic,
    openai_usage,
    to_anthropic,
)
from proxy.settings import Provider, Timeouts
from proxy.sse import ChatStreamTap, SSEDecoder
from proxy.upstream import UpstreamClient, UpstreamStreamError
from tests.conftest import (
    KEY,
    WEATHER_TOOLS,
    GatewayProcess,
    add_tool_call_deltas,
    base_config,
    module_gateway,
    server_fixtures,
)
from tests.conftest import openai_client as client
from tests.mock_anthropic import SIGNATURE, TEXT, THINKING, TOOLS, MockAnthropic

HI = [{"role": "user", "content": "hi"}]
PRICES = {"input": 3.0, "output": 15.0, "cached_input": 0.3}


anthropic_mock, amock = server_fixtures(MockAnthropic, "anthropic_mock", "amock")


def anthropic_config(mock_upstream, anthropic_mock: MockAnthropic, workdir, **overrides: Any) -> dict[str, Any]:
    config = base_config(mock_upstream, workdir, **overrides)
    config["providers"] += [
        {"id": "anthropic", "protocol": "anthropic", "base_url": anthropic_mock.base_url, "api_key": "sk-ant-test"},
        {"id": "anthropic-next", "protocol": "anthropic", "base_url": anthropic_mock.base_url + "/v1/",
         "api_key": "sk-ant-next", "api_version": "2026-10-21", "headers": {"anthropic-beta": "beta-1"}},
    ]
    config["models"] += [
        {"name": "claude-test", "provider": "anthropic", "model": "claude-sonnet-test", "prices": PRICES},
        {"name": "claude-cached", "provider": "anthropic", "model": "claude-cache", "prices": PRICES},
    ]
    return config


@pytest.fixture(scope="module")
def gw(mock_upstream, anthropic_mock: MockAnthropic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from module_gateway(tmp_path_factory, "gateway-anthropic",
                              config=lambda workdir: anthropic_config(mock_upstream, anthropic_mock, workdir))


def sent(amock: MockAnthropic) -> dict[str, Any]:
    return amock.last()["body"]


# -- end to end: text -----------------------------------------------------------------------


def test_text_non_stream(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(model="claude-test", messages=HI)
    completion = raw.parse()
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "claude-sonnet-test-20250101"  # the model that served
    assert completion.id == "msg_mock01"
    assert completion.object == "chat.completion"
    assert completion.created > 0
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (12, 6, 18)
    assert raw.headers["x-request-id"] == "req_mock_ok"

    request = amock.last()
    assert request["path"] == "/v1/messages"
    assert request["headers"]["x-api-key"] == "sk-ant-test"
    assert request["headers"]["anthropic-version"] == "2023-06-01"
    assert request["headers"]["Content-Type"] == "application/json"
    assert "Authorization" not in request["headers"]
    assert request["body"] == {"model": "claude-sonnet-test", "messages": [{"role": "user", "content": "hi"}],
                               "max_tokens": 4096}  # the default max_tokens; no `stream`

    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 200
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx((12 * 3.0 + 6 * 15.0) / 1e6)
    assert record["completion_message"] == {"role": "assistant", "content": TEXT}


def test_text_stream_without_include_usage(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(model="claude-test", messages=HI, stream=True)
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert all(c.usage is None and c.choices for c in chunks)  # the usage chunk is hidden
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"claude-sonnet-test-20250101"}
    assert {c.id for c in chunks} == {"msg_mock01"}
    assert sent(amock)["stream"] is True
    assert sent(amock)["max_tokens"] == 4096
    assert "stream_options" not in sent(amock)

    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["stream"] is True
    assert record["status_code"] == 200
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx((12 * 3.0 + 6 * 15.0) / 1e6)
    assert record["completion_message"] == {"role": "assistant", "content": TEXT}
    assert record["time_to_first_token"] > 0
    assert not record["warnings"]


def test_text_stream_with_include_usage(gw, amock):
    chunks = list(client(gw).chat.completions.create(
        model="claude-test", messages=HI, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and chunks[-1].choices == []
    usage = usage_chunks[0].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 6, 18)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_stream_bytes_are_openai_sse(gw, amock):
    with httpx.stream("POST", f"{gw.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "claude-test", "messages": HI, "stream": True}, timeout=10) as response:
        data = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in data.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    for e in events[:-1]:
        assert orjson.loads(e[6:])["object"] == "chat.completion.chunk"


def test_stream_split_into_small_reads(gw, amock):
    """Events cut at any byte, CRLF line ends: the same answer."""
    chunks = list(client(gw).chat.completions.create(
        model="anthropic/claude-split", messages=HI, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert chunks[-1].usage.prompt_tokens == 12


# -- end to end: request shape ----------------------------------------------------------------


def test_system_multi_turn_and_params(gw, amock):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use English."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Second part"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Tell me"}]},
    ]
    client(gw).chat.completions.create(
        model="claude-test", messages=messages, temperature=0.5, top_p=0.9, stop="END", max_completion_tokens=100,
        user="customer-7", presence_penalty=0.1, frequency_penalty=0.2, seed=3, logit_bias={"1": 1}, n=1,
        response_format={"type": "json_object"}, extra_body={"top_k": 40},
    )
    body = sent(amock)
    assert body["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use English."}]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "Second part"}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me"},
    ]
    assert body["temperature"] == 0.5
    assert body["top_p"] == 0.9
    assert body["top_k"] == 40
    assert body["stop_sequences"] == ["END"]
    assert body["max_tokens"] == 100
    assert body["metadata"] == {"user_id": "customer-7"}
    for dropped in ("presence_penalty", "frequency_penalty", "seed", "logit_bias", "n", "response_format", "user",
                    "stop", "max_completion_tokens"):
        assert dropped not in body


def test_single_system_string_and_stop_list(gw, amock):
    client(gw).chat.completions.create(
        model="claude-test", messages=[{"role": "system", "content": "Be brief."}, *HI], stop=["a", "b"], max_tokens=77)
    body = sent(amock)
    assert body["system"] == "Be brief."
    assert body["stop_sequences"] == ["a", "b"]
    assert body["max_tokens"] == 77


def test_api_version_2026_drops_sampling_params(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="anthropic-next/claude-x", messages=HI, temperature=0.2, top_p=0.5)
    assert raw.parse().choices[0].message.content == TEXT  # the mock refuses them on this version
    request = amock.last()
    assert request["path"] == "/v1/messages"  # a base_url ending in /v1 is not doubled
    assert request["headers"]["anthropic-version"] == "2026-10-21"
    assert request["headers"]["anthropic-beta"] == "beta-1"
    assert request["headers"]["x-api-key"] == "sk-ant-next"
    assert "temperature" not in request["body"] and "top_p" not in request["body"]
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["warnings"] == ["temperature, top_p and top_k are not sent: anthropic-version 2026-10-21 "
                                  "does not accept them",
                                  "no price known for anthropic-next/claude-x: cost not computed"]


def test_images_url_and_base64(gw, amock):
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQSkZJRg=="}},
    ]
    answer = client(gw).chat.completions.create(model="claude-test", messages=[{"role": "user", "content": content}])
    assert answer.choices[0].message.content == TEXT
    assert sent(amock)["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What is in these?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRg=="}},
    ]}]


def test_cache_control_passed_through(gw, amock):
    ephemeral = {"type": "ephemeral"}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "A long system prompt", "cache_control": ephemeral}]},
        {"role": "user", "content": [{"type": "text", "text": "Long document", "cache_control": ephemeral},
                                     {"type": "text", "text": "Question?"}]},
    ]
    tools = [{**WEATHER_TOOLS[0], "cache_control": ephemeral}]
    client(gw).chat.completions.create(model="claude-test", messages=messages, tools=tools)
    body = sent(amock)
    assert body["system"] == [{"type": "text", "text": "A long system prompt", "cache_control": ephemeral}]
    assert body["messages"][0]["content"][0] == {"type": "text", "text": "Long document", "cache_control": ephemeral}
    assert body["tools"][0]["cache_control"] == ephemeral


def test_untranslatable_content_is_a_400(gw, amock):
    content = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(model="claude-test", messages=[{"role": "user", "content": content}])
    assert "input_audio" in info.value.response.json()["detail"]
    assert not amock.requests  # never sent


# -- end to end: tools ----------------------------------------------------------------------


def test_tools_non_stream(gw, amock):
    answer = client(gw).chat.completions.create(
        model="anthropic/claude-tools", messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=WEATHER_TOOLS, tool_choice="required")
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert [(c.id, c.type, c.function.name, orjson.loads(c.function.arguments)) for c in message.tool_calls] == [
        (tool_id, "function", name, args) for tool_id, name, args in TOOLS]
    body = sent(amock)
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather in a city",
         "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}},
    ]
    assert body["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize(("choice", "parallel", "expected"), [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "get_time"}}, None, {"type": "tool", "name": "get_time"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
])
def test_tool_choice_mapping(gw, amock, choice, parallel, expected):
    extra: dict[str, Any] = {}
    if choice is not None:
        extra["tool_choice"] = choice
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    client(gw).chat.completions.create(model="claude-test", messages=HI, tools=WEATHER_TOOLS, **extra)
    assert sent(amock)["tool_choice"] == expected


def test_tools_stream(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="anthropic/claude-tools", messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=WEATHER_TOOLS, stream=True)
    calls: dict[int, dict[str, Any]] = {}
    text = ""
    finish = None
    for c in raw.parse():
        choice = c.choices[0]
        text += choice.delta.content or ""
        add_tool_call_deltas(calls, choice.delta.tool_calls)
        finish = choice.finish_reason or finish
    assert text == "Let me check."
    assert finish == "tool_calls"
    assert [(calls[i]["id"], calls[i]["name"], orjson.loads(calls[i]["arguments"])) for i in sorted(calls)] == [
        (tool_id, name, args) for tool_id, name, args in TOOLS]

    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 200
    logged = record["completion_message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in logged] == [
        (tool_id, name, args) for tool_id, name, args in TOOLS]


def test_tools_stream_with_sdk_accumulation(gw, amock):
    """The openai SDK's own stream helper rebuilds the tool calls from the deltas."""
    with client(gw).chat.completions.stream(
        model="anthropic/claude-tools", messages=[{"role": "user", "content": "Weather?"}], tools=WEATHER_TOOLS,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == list(TOOLS)
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_result_round_trip(gw, amock):
    c = client(gw)
    first = c.chat.completions.create(model="anthropic/claude-tools", tools=WEATHER_TOOLS,
                                      messages=[{"role": "user", "content": "Weather and time in Paris?"}])
    assistant = first.choices[0].message.model_dump(exclude_none=True)
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        assistant,
        {"role": "tool", "tool_call_id": "toolu_01", "content": "18C and sunny"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": [{"type": "text", "text": "14:05"}]},
        {"role": "user", "content": "Thanks, summarise."},
    ]
    answer = c.chat.completions.create(model="claude-test", tools=WEATHER_TOOLS, messages=messages)
    assert answer.choices[0].message.content == TEXT  # the mock found the conversation valid
    assert sent(amock)["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {"tz": "Europe/Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C and sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_02", "content": [{"type": "text", "text": "14:05"}]},
            {"type": "text", "text": "Thanks, summarise."},
        ]},
    ]


# -- end to end: thinking -------------------------------------------------------------------


def test_thinking_non_stream_and_multi_turn(gw, amock):
    c = client(gw)
    thinking = {"type": "enabled", "budget_tokens": 2048}
    answer = c.chat.completions.create(model="anthropic/claude-thinking", messages=HI, extra_body={"thinking": thinking})
    message = answer.choices[0].message.model_dump()
    assert message["content"] == TEXT
    assert message["reasoning_content"] == THINKING
    assert message["thinking_blocks"] == [{"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}]
    assert sent(amock)["thinking"] == thinking
    assert sent(amock)["max_tokens"] == 4096

    # the assistant message goes back with its signed thinking block first
    assistant = {k: v for k, v in message.items() if v is not None}
    c.chat.completions.create(model="anthropic/claude-thinking", extra_body={"thinking": thinking},
                              messages=[*HI, assistant, {"role": "user", "content": "And?"}])
    assert sent(amock)["messages"][1] == {"role": "assistant", "content": [
        {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE},
        {"type": "text", "text": TEXT},
    ]}


def test_thinking_stream(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="anthropic/claude-thinking", messages=HI, stream=True, reasoning_effort="medium")
    chunks = list(raw.parse())
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == THINKING
    assert "".join(d.get("content") or "" for d in deltas) == TEXT
    blocks = [b for d in deltas for b in d.get("thinking_blocks") or []]
    assert blocks == [{"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}]
    assert sent(amock)["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert sent(amock)["max_tokens"] == 8192  # raised above the budget
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 200
    assert record["completion_message"] == {"role": "assistant", "content": TEXT, "reasoning_content": THINKING}


# -- end to end: usage, cache tokens and cost -------------------------------------------------


def expected_cache_cost() -> float:
    # 305 prompt tokens of which 200 read from the cache (the cache price), 6 completion tokens
    return ((305 - 200) * 3.0 + 200 * 0.3 + 6 * 15.0) / 1e6


def test_cache_usage_non_stream(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(model="claude-cached", messages=HI)
    usage = raw.parse().usage.model_dump()
    assert usage["prompt_tokens"] == 5 + 100 + 200
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == 311
    assert usage["prompt_tokens_details"]["cached_tokens"] == 200
    assert usage["prompt_tokens_details"]["cache_creation_tokens"] == 100
    assert usage["cache_read_input_tokens"] == 200
    assert usage["cache_creation_input_tokens"] == 100
    record = gw.record(raw.headers["x-respan-log-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (305, 6)
    assert record["prompt_cache_hit_tokens"] == 200
    assert record["prompt_cache_creation_tokens"] == 100
    assert record["cost"] == pytest.approx(expected_cache_cost())


def test_cache_usage_stream(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="claude-cached", messages=HI, stream=True, stream_options={"include_usage": True})
    usage = list(raw.parse())[-1].usage.model_dump()
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (305, 6)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 200
    assert usage["cache_creation_input_tokens"] == 100
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["prompt_cache_hit_tokens"] == 200
    assert record["prompt_cache_creation_tokens"] == 100
    assert record["cost"] == pytest.approx(expected_cache_cost())


# -- end to end: stop reasons -----------------------------------------------------------------


@pytest.mark.parametrize(("reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("refusal", "content_filter"),
    ("pause_turn", "stop"), ("model_context_window_exceeded", "length"),
])
def test_stop_reason_mapping(gw, amock, reason, finish):
    answer = client(gw).chat.completions.create(model=f"anthropic/claude-stop-{reason}", messages=HI)
    assert answer.choices[0].finish_reason == finish


def test_stop_reason_mapping_stream(gw, amock):
    chunks = list(client(gw).chat.completions.create(model="anthropic/claude-stop-max_tokens", messages=HI, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


# -- end to end: errors -----------------------------------------------------------------------


@pytest.mark.parametrize(("code", "exc", "status", "kind"), [
    (400, openai.BadRequestError, 400, "invalid_request_error"),
    (401, openai.AuthenticationError, 401, "authentication_error"),
    (403, openai.PermissionDeniedError, 403, "permission_error"),
    (404, openai.NotFoundError, 404, "not_found_error"),
    (429, openai.RateLimitError, 429, "rate_limit_error"),
    (500, openai.InternalServerError, 500, "api_error"),
    (529, openai.InternalServerError, 503, "overloaded_error"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_errors_mapped(gw, amock, code, exc, status, kind, stream):
    with pytest.raises(exc) as info:
        client(gw).chat.completions.create(model=f"anthropic/claude-status-{code}", messages=HI, stream=stream)
    response = info.value.response
    assert response.status_code == status
    assert response.json() == {"error": {"message": f"mock {kind}", "type": kind, "param": None, "code": kind}}
    assert response.headers["x-request-id"] == "req_mock_error"
    if code == 429:
        assert response.headers["retry-after"] == "7"
        assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == status
    assert record["error_message"] == f"{status}: mock {kind}"


def test_non_json_error_body(gw, amock):
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).chat.completions.create(model="anthropic/claude-raw-502", messages=HI)
    assert info.value.response.status_code == 502
    error = info.value.response.json()["error"]
    assert error["type"] == "api_error"
    assert "Bad Gateway" in error["message"]


def test_unreadable_success_body_is_a_502(gw, amock):
    with pytest.raises(openai.APIStatusError) as info:
        client(gw).chat.completions.create(model="anthropic/claude-garbage", messages=HI)
    assert info.value.response.status_code == 502
    assert info.value.response.json()["error"]["code"] == "bad_response"


def test_overloaded_error_inside_stream(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(model="anthropic/claude-stream-error", messages=HI,
                                                                stream=True)
    text = ""
    with pytest.raises(openai.APIError) as info:
        for c in raw.parse():
            text += c.choices[0].delta.content or ""
    assert text == TEXT  # what came before the error reached the client
    assert info.value.message == "Overloaded"
    assert info.value.body == {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": 503}
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 503
    assert record["status"] == "error"
    assert record["error_message"] == "503: Overloaded"
    # message_start's input tokens; one output token per delta sent
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["warnings"] == ["no price known for anthropic/claude-stream-error: cost not computed"]


def test_overloaded_error_as_first_stream_event(gw, amock):
    raw = client(gw).chat.completions.with_raw_response.create(model="anthropic/claude-stream-error-first",
                                                                messages=HI, stream=True)
    with pytest.raises(openai.APIError) as info:
        list(raw.parse())
    assert info.value.message == "Overloaded"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 503
    assert record["error_message"] == "503: Overloaded"


@pytest.mark.parametrize("model", ["claude-cut", "claude-truncated"])
def test_broken_stream(gw, amock, model):
    raw = client(gw).chat.completions.with_raw_response.create(model=f"anthropic/{model}", messages=HI, stream=True)
    text = ""
    with pytest.raises(openai.APIError) as info:
        for c in raw.parse():
            text += c.choices[0].delta.content or ""
    assert text == TEXT
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 502
    assert record["error_message"] == info.value.message
    assert "anthropic" in record["error_message"]
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)


def test_overloaded_before_content_falls_back(mock_upstream, anthropic_mock, amock, tmp_path):
    """529 (as 503), or an error event before any content, is a failure the fallback stage acts on."""
    config = anthropic_config(mock_upstream, anthropic_mock, tmp_path, pipeline=["auth", "routing", "fallback"])
    gateway = GatewayProcess(config, tmp_path).start()
    try:
        extra = {"fallback_models": ["claude-test"], "retry_params": {"num_retries": 1, "retry_after": 0.01}}
        for model, stream in (("anthropic/claude-status-529", False), ("anthropic/claude-stream-error-first", True)):
            amock.reset()
            raw = client(gateway).chat.completions.with_raw_response.create(
                model=model, messages=HI, stream=stream, extra_body=extra)
            answer = raw.parse()
            text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream else \
                answer.choices[0].message.content
            assert text == TEXT
            assert raw.headers["x-llmrelay-attempts"] == "3"  # tried, retried, then the fallback
            assert [r["body"]["model"] for r in amock.requests] == [model.split("/")[1]] * 2 + ["claude-sonnet-test"]
    finally:
        gateway.stop()


def test_client_leaving_closes_the_upstream_stream(gw, amock):
    with httpx.stream("POST", f"{gw.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "anthropic/claude-slow", "messages": HI, "stream": True}, timeout=10) as response:
        for received, _ in enumerate(response.iter_raw(), start=1):
            if received == 3:
                break
    deadline = time.monotonic() + 5
    while not amock.stream_closed_early and time.monotonic() < deadline:
        time.sleep(0.02)
    assert amock.stream_closed_early and amock.stream_closed_early[0]["sent"] < 50
    record = gw.record(response.headers["x-respan-log-id"])
    assert record["status_code"] == 499


# -- unit: request translation ----------------------------------------------------------------


def test_unit_minimal_request():
    assert to_anthropic({"messages": HI}, "claude-x") == {"model": "claude-x", "messages": HI, "max_tokens": 4096}
    assert to_anthropic({"messages": HI}, "claude-x", stream=True)["stream"] is True


def test_unit_sampling_params():
    body = {"messages": HI, "temperature": 0.1, "top_p": 0.2, "top_k": 3}
    assert {k: to_anthropic(body, "m")[k] for k in ("temperature", "top_p", "top_k")} == {
        "temperature": 0.1, "top_p": 0.2, "top_k": 3}
    assert set(to_anthropic(body, "m", sampling=False)) == {"model", "messages", "max_tokens"}


def test_unit_dropped_fields():
    body = {"messages": HI, **{k: 1 for k in DROPPED_FIELDS}, "something_unknown": True}
    assert set(to_anthropic(body, "m")) == {"model", "messages", "max_tokens"}


def test_unit_max_tokens_precedence():
    assert to_anthropic({"messages": HI, "max_tokens": 10, "max_completion_tokens": 20}, "m")["max_tokens"] == 20
    assert to_anthropic({"messages": HI, "max_tokens": 10}, "m")["max_tokens"] == 10


@pytest.mark.parametrize(("effort", "budget", "max_tokens"), [
    ("minimal", 1024, 4096), ("low", 1024, 4096), ("medium", 4096, 8192), ("high", 16384, 20480),
])
def test_unit_reasoning_effort(effort, budget, max_tokens):
    out = to_anthropic({"messages": HI, "reasoning_effort": effort}, "m")
    assert out["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert out["max_tokens"] == max_tokens


def test_unit_reasoning_effort_none_and_explicit_thinking_wins():
    assert "thinking" not in to_anthropic({"messages": HI, "reasoning_effort": "none"}, "m")
    thinking = {"type": "enabled", "budget_tokens": 2000}
    out = to_anthropic({"messages": HI, "reasoning_effort": "high", "thinking": thinking, "max_tokens": 3000}, "m")
    assert out["thinking"] == thinking and out["max_tokens"] == 3000
    with pytest.raises(BadRequest):
        to_anthropic({"messages": HI, "reasoning_effort": "enormous"}, "m")


def test_unit_message_level_cache_control_and_tool_messages():
    ephemeral = {"type": "ephemeral"}
    out = to_anthropic({"messages": [
        {"role": "system", "content": "S", "cache_control": ephemeral},
        {"role": "user", "content": "U", "cache_control": ephemeral},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "R", "cache_control": ephemeral},
    ]}, "m")
    assert out["system"] == [{"type": "text", "text": "S", "cache_control": ephemeral}]
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "U", "cache_control": ephemeral}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "R",
                                      "cache_control": ephemeral}]},
    ]


def test_unit_tool_results_go_first_and_empty_text_is_dropped():
    out = to_anthropic({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "user", "content": "before"},
        {"role": "tool", "tool_call_id": "t1", "content": "R"},
    ]}, "m")
    assert out["messages"][1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]}
    assert [b["type"] for b in out["messages"][2]["content"]] == ["tool_result", "text"]


def test_unit_documents_and_native_blocks():
    pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}
    native = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
    out = to_anthropic({"messages": [{"role": "user", "content": [pdf, native]}]}, "m")
    assert out["messages"][0]["content"] == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
        native,
    ]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}],
    [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}],
    [{"role": "tool", "content": "no id"}],
    [{"role": "function", "name": "f", "content": "x"}],
    [{"role": "assistant", "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "[1]"}}]}],
    [{"role": "assistant", "tool_calls": [{"id": "t", "function": {"name": "f", "arguments": "{bad"}}]}],
    [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
])
def test_unit_untranslatable_requests(messages):
    with pytest.raises(BadRequest):
        to_anthropic({"messages": messages}, "m")


def test_unit_anthropic_tools_and_json_schema():
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    out = to_anthropic({"messages": HI, "tools": [server_tool], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, "m")
    assert out["tools"] == [server_tool]
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": {"type": "object"}}}


# -- unit: response translation ---------------------------------------------------------------


def test_unit_usage():
    assert openai_usage({"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 5,
                         "cache_read_input_tokens": 6}) == {
        "prompt_tokens": 14, "completion_tokens": 4, "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 6, "cache_creation_tokens": 5},
        "cache_creation_input_tokens": 5, "cache_read_input_tokens": 6,
    }
    assert openai_usage({"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": None})["prompt_tokens"] == 3


def test_unit_response_with_everything():
    data = {"id": "msg_1", "model": "claude-x-1", "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 2},
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s1"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "A"},
                {"type": "text", "text": "B"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": [1, 2]}},
            ]}
    out = from_anthropic(data)
    message = out["choices"][0]["message"]
    assert out["id"] == "msg_1" and out["model"] == "claude-x-1" and out["object"] == "chat.completion"
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] == "AB"
    assert message["reasoning_content"] == "hmm"
    assert message["thinking_blocks"] == [{"type": "thinking", "thinking": "hmm", "signature": "s1"},
                                          {"type": "redacted_thinking", "data": "opaque"}]
    assert message["tool_calls"] == [{"id": "t1", "type": "function",
                                      "function": {"name": "f", "arguments": '{"x":[1,2]}'}}]
    # and the thinking blocks go back as they came
    again = to_anthropic({"messages": [*HI, message, {"role": "user", "content": "more"}]}, "m")
    assert again["messages"][1]["content"][:2] == message["thinking_blocks"]


def test_unit_only_tool_calls_means_null_content():
    out = from_anthropic({"content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "stop_reason": "tool_use"})
    assert out["choices"][0]["message"]["content"] is None


def test_unit_prompt_too_long_is_context_length_exceeded():
    raw = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "prompt is too long: 208000 tokens > 200000 maximum"}})
    status, body = error_reply_body(400, raw)
    assert status == 400
    assert orjson.loads(body)["error"]["code"] == "context_length_exceeded"
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("status", "raw", "expected_status", "kind"), [
    (400, orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": "m"}}), 400,
     "invalid_request_error"),
    (413, orjson.dumps({"type": "error", "error": {"type": "request_too_large", "message": "m"}}), 413,
     "request_too_large"),
    (529, orjson.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "m"}}), 503,
     "overloaded_error"),
    (402, orjson.dumps({"type": "error", "error": {"type": "billing_error", "message": "m"}}), 402, "billing_error"),
    (529, b"", 503, "overloaded_error"),
    (504, b"<html>timeout</html>", 504, "timeout_error"),
    (418, b"teapot", 418, "invalid_request_error"),
])
def test_unit_error_mapping(status, raw, expected_status, kind):
    out_status, body = error_reply_body(status, raw)
    error = orjson.loads(body)["error"]
    assert out_status == expected_status
    assert error["type"] == error["code"] == kind
    assert error["param"] is None
    assert error["message"]


# -- unit: stream translation -----------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


def translate(data: bytes) -> list[Any]:
    decoder = SSEDecoder()
    translator = StreamTranslator("m")
    out = translator.feed(decoder.feed(data)) + translator.feed(decoder.flush()) + translator.finish()
    return [b"[DONE]" if e == b"data: [DONE]" else orjson.loads(e[6:]) for e in out.split(b"\n\n") if e]


START = {"type": "message_start", "message": {"id": "msg_s", "model": "claude-s", "usage": {
    "input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 4}}}


def test_unit_stream_text_and_usage():
    chunks = translate(sse(
        START, {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "stop_sequence"}, "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert chunks[2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["prompt_tokens"] == 14
    assert chunks[3]["usage"]["completion_tokens"] == 9
    assert chunks[3]["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
    assert chunks[4] == b"[DONE]"
    assert {c["id"] for c in chunks[:4]} == {"msg_s"} and {c["model"] for c in chunks[:4]} == {"claude-s"}


def test_unit_stream_through_the_core_tap():
    """What the core's tap reads from the translated stream: usage, finish reason, tool calls."""
    data = sse(
        START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t1", "name": "f",
                                                                       "input": {}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"a"'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ": 1}"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    )
    translator = StreamTranslator("m")
    tap = ChatStreamTap(hide_usage_chunk=True)
    forwarded = tap.feed(translator.feed(SSEDecoder().feed(data)))
    assert tap.done and tap.finish_reasons == {0: "tool_calls"}
    assert tap.usage["prompt_tokens"] == 14 and tap.usage["completion_tokens"] == 5
    assert b'"usage"' not in forwarded  # hidden from a client that did not ask
    assert tap.messages() == [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]


def test_unit_stream_error_event_ends_the_stream():
    chunks = translate(sse(
        START,
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {"type": "message_stop"},  # nothing after an error is sent
    ))
    assert chunks[-1] == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": 503}}
    assert b"[DONE]" not in chunks


def test_unit_stream_without_a_stop_reason_is_broken():
    translator = StreamTranslator("m")
    translator.feed(SSEDecoder().feed(sse(START)))
    assert translator.finish() == b""
    assert not translator.complete
    assert translator.partial_usage() == b""  # nothing went out: the error must be the first event


def test_unit_partial_usage_after_content():
    translator = StreamTranslator("m")
    out = translator.feed(SSEDecoder().feed(sse(START, *[
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}} for w in "abc"])))
    assert out.count(b"\n\n") == 4  # role chunk and three deltas
    usage = orjson.loads(translator.partial_usage()[6:])["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (14, 3)


class FakeResponse:
    """Stands for proxy.upstream.UpstreamResponse: chunks() yields the given bytes, then maybe breaks."""

    def __init__(self, parts: list[bytes], error: Exception | None = None) -> None:
        self.parts = parts
        self.error = error
        self.closed = False
        self.read_parts = 0

    async def chunks(self):
        try:
            for part in self.parts:
                self.read_parts += 1
                yield part
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


def adapter() -> AnthropicMessages:
    config = Provider(id="anthropic", protocol="anthropic", base_url="https://api.anthropic.com")
    return AnthropicMessages(config, Timeouts(), UpstreamClient())


async def collect(stream) -> tuple[bytes, Exception | None]:
    out = b""
    try:
        async for data in stream:
            out += data
    except UpstreamStreamError as exc:
        return out, exc
    return out, None


TARGET = Target(provider="anthropic", protocol="anthropic", model="m")
TEXT_EVENTS = [START, {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}]


def test_unit_adapter_stream_closing_closes_upstream():
    async def main() -> None:
        response = FakeResponse([sse(START), sse(*TEXT_EVENTS[1:])] + [b": keep-alive\n\n"] * 10)
        stream = adapter()._stream(response, TARGET)
        await anext(stream)  # the text delta (message_start alone sends nothing)
        await stream.aclose()
        assert response.closed and response.read_parts == 2

    asyncio.run(main())


def test_unit_adapter_stream_error_event_stops_reading():
    async def main() -> None:
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        response = FakeResponse([sse(*TEXT_EVENTS), sse(error), sse({"type": "message_stop"})])
        out, exc = await collect(adapter()._stream(response, TARGET))
        assert exc is None and response.closed and response.read_parts == 2
        events = out.split(b"\n\n")
        assert b'"usage"' in events[-3] and events[-2].startswith(b'data: {"error"')

    asyncio.run(main())


def test_unit_adapter_stream_break_keeps_its_message_and_sends_usage_first():
    async def main() -> None:
        response = FakeResponse([sse(*TEXT_EVENTS)], UpstreamStreamError("provider 'anthropic' broke the stream"))
        out, exc = await collect(adapter()._stream(response, TARGET))
        assert str(exc) == "provider 'anthropic' broke the stream"
        assert b'"usage"' in out and b"[DONE]" not in out

    asyncio.run(main())


def test_unit_adapter_stream_truncated():
    async def main() -> None:
        out, exc = await collect(adapter()._stream(FakeResponse([sse(*TEXT_EVENTS)]), TARGET))
        assert "ended the stream before the message was complete" in str(exc)
        assert b'"usage"' in out

    asyncio.run(main())


def test_unit_url_and_headers():
    a = adapter()
    assert a.url(TARGET) == "https://api.anthropic.com/v1/messages"
    assert a.url(Target(provider="anthropic", protocol="anthropic", model="m",
                        base_url="https://proxy.example/v1/")) == "https://proxy.example/v1/messages"
    headers = a.request_headers(Target(provider="anthropic", protocol="anthropic", model="m", api_key="k"))
    assert headers == {"content-type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": "k"}
    versioned = AnthropicMessages(Provider(id="a", protocol="anthropic", base_url="https://x", api_version="2024-01-01",
                                           headers={"anthropic-beta": "b1"}), Timeouts(), UpstreamClient())
    custom = Target(provider="a", protocol="anthropic", model="m", api_key="c", custom_credential=True,
                    base_url="https://elsewhere")
    assert versioned.request_headers(custom) == {"content-type": "application/json",
                                                 "anthropic-version": "2024-01-01", "x-api-key": "c"}
    own = versioned.request_headers(Target(provider="a", protocol="anthropic", model="m", api_key="k"))
    assert own["anthropic-beta"] == "b1" and own["anthropic-version"] == "2024-01-01"


def test_unit_stream_missing_message_stop_still_completes():
    chunks = translate(sse(START, {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                   "usage": {"output_tokens": 2}}))
    assert chunks[-1] == b"[DONE]"
    assert chunks[-2]["usage"]["completion_tokens"] == 2


# -- the mock itself: the official anthropic SDK reads its answers --------------------------------


@pytest.mark.parametrize("model", ["claude-x", "claude-tools", "claude-thinking", "claude-cache"])
def test_mock_speaks_what_the_anthropic_sdk_reads(amock, model):
    """The mock's streams rebuild into the same message as its whole answers (so the tests above
    exercise the adapter against the real wire format)."""
    import anthropic

    sdk = anthropic.Anthropic(base_url=amock.base_url, api_key="sk-ant-test", max_retries=0)
    whole = sdk.messages.create(model=model, max_tokens=100, messages=HI)
    with sdk.messages.stream(model=model, max_tokens=100, messages=HI) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in streamed.content] == [
        b.model_dump(exclude_none=True) for b in whole.content]
    assert streamed.stop_reason == whole.stop_reason
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    assert streamed.usage.cache_read_input_tokens == whole.usage.cache_read_input_tokens
    with pytest.raises(anthropic.InternalServerError) as info:
        sdk.messages.create(model="claude-status-529", max_tokens=10, messages=HI)
    assert info.value.status_code == 529
