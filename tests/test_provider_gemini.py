"""The Gemini adapter (proxy/providers/gemini.py): OpenAI chat in, generateContent upstream, OpenAI out.

End to end through a real gateway process against tests/mock_gemini.py with the official `openai`
SDK, plus fast unit tests of the translation functions.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.errors import BadRequest
from proxy.providers.gemini import (
    GeminiGenerateContent,
    StreamTranslator,
    clean_schema,
    error_body,
    from_gemini,
    guess_mime,
    to_gemini,
    to_usage,
)
from proxy.settings import Provider, Timeouts
from proxy.upstream import UpstreamClient
from tests.conftest import KEY, GatewayProcess, module_gateway, server_fixtures
from tests.conftest import openai_client as client
from tests.mock_gemini import ANSWER, THOUGHT, MockGemini
from tests.test_streaming import events

GEMINI_KEY = "gm-test-key"
PRICES = {"input": 1.0, "output": 2.0, "cached_input": 0.5}
HI = [{"role": "user", "content": "hi"}]
# USAGE: 12 prompt tokens (4 cached), 6 completion tokens
EXPECTED_COST = ((12 - 4) * 1.0 + 4 * 0.5 + 6 * 2.0) / 1e6
WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "strict": True,
        "parameters": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                       "additionalProperties": False,
                       "properties": {"city": {"type": "string", "description": "City name"},
                                      "unit": {"type": ["string", "null"], "enum": ["C", "F"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


gemini_mock, gm = server_fixtures(MockGemini, "gemini_mock", "gm")


@pytest.fixture(scope="module")
def gw(gemini_mock, mock_upstream, tmp_path_factory) -> Iterator[GatewayProcess]:
    """One gateway for the module: a `gemini` provider on the mock, models with prices."""
    yield from module_gateway(
        tmp_path_factory, "gemini-gateway", mock_upstream,
        providers=[{"id": "gemini", "protocol": "gemini", "base_url": gemini_mock.base_url, "api_key": GEMINI_KEY}],
        models=[
            {"name": "gemini-test", "provider": "gemini", "model": "gm-text", "prices": PRICES},
            {"name": "gemini-tools", "provider": "gemini", "model": "gm-tools", "prices": PRICES},
        ],
    )


def raw_post(gw: GatewayProcess, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{gw.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      content=orjson.dumps(body), timeout=10) as response:
        data = b"".join(response.iter_raw())
    return response, data


# -- end to end -------------------------------------------------------------------------


def test_text_request_shape_usage_and_cost(gw, gm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi. What do you need?"},
        {"role": "user", "content": "A greeting"},
        {"role": "user", "content": [{"type": "text", "text": "from Gemini"}]},
    ]
    raw = client(gw).chat.completions.with_raw_response.create(model="gemini-test", messages=messages)
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gm-text-001"  # Gemini's modelVersion
    assert completion.object == "chat.completion"
    assert completion.usage.prompt_tokens == 12
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == 18
    assert completion.usage.prompt_tokens_details.cached_tokens == 4

    request = gm.last()
    assert request["path"] == "/v1beta/models/gm-text:generateContent"
    assert request["headers"]["x-goog-api-key"] == GEMINI_KEY
    assert GEMINI_KEY not in request["url"] and not request["query"]  # the key never goes in the URL
    assert "Authorization" not in request["headers"]
    body = request["body"]
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Answer in English."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Hello?"}]},
        {"role": "model", "parts": [{"text": "Hi. What do you need?"}]},
        {"role": "user", "parts": [{"text": "A greeting"}, {"text": "from Gemini"}]},  # merged
    ]
    assert "generationConfig" not in body and "tools" not in body

    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 200 and record["status"] == "success"
    assert record["provider_id"] == "gemini"
    assert record["prompt_tokens"] == 12
    assert record["completion_tokens"] == 6
    assert record["prompt_cache_hit_tokens"] == 4
    assert record["cost"] == pytest.approx(EXPECTED_COST)
    assert raw.headers["x-llmrelay-provider"] == "gemini"


def test_text_stream_usage_hidden_and_accounted(gw, gm):
    stream = client(gw).chat.completions.with_raw_response.create(model="gemini-test", messages=HI, stream=True)
    chunks = list(stream.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # the usage chunk is the relay's to hide
    assert all(c.model == "gm-text-001" for c in chunks)
    assert len({c.id for c in chunks}) == 1

    request = gm.last()
    assert request["path"] == "/v1beta/models/gm-text:streamGenerateContent"
    assert request["query"] == {"alt": "sse"}
    assert request["headers"]["x-goog-api-key"] == GEMINI_KEY

    record = gw.record(stream.headers["x-respan-log-id"])
    assert record["stream"] is True and record["status_code"] == 200 and record["status"] == "success"
    assert (record["prompt_tokens"], record["completion_tokens"], record["prompt_cache_hit_tokens"]) == (12, 6, 4)
    assert record["cost"] == pytest.approx(EXPECTED_COST)
    assert record["completion_message"]["content"] == ANSWER
    assert record["time_to_first_token"] is not None


def test_stream_with_include_usage_and_raw_shape(gw, gm):
    response, data = raw_post(gw, {"model": "gemini-test", "messages": HI, "stream": True,
                                   "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    payloads = events(data)
    assert payloads[-1] == b"[DONE]"
    usage_chunk = orjson.loads(payloads[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18,
                                    "prompt_tokens_details": {"cached_tokens": 4}}
    first = orjson.loads(payloads[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_images_inline_and_by_url(gw, gm):
    png = base64.b64encode(b"\x89PNG fake").decode()
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?size=large", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/photo"}},
    ]
    client(gw).chat.completions.create(model="gemini-test", messages=[{"role": "user", "content": content}])
    assert gm.last()["body"]["contents"] == [{"role": "user", "parts": [
        {"text": "What is in these?"},
        {"inlineData": {"mimeType": "image/png", "data": png}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?size=large"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photo"}},  # the default
    ]}]


def test_tools_call_and_round_trip(gw, gm):
    api = client(gw)
    messages: list[Any] = [{"role": "user", "content": "Weather and time in Paris?"}]
    completion = api.chat.completions.create(model="gemini-tools", messages=messages, tools=WEATHER_TOOLS,
                                             tool_choice="required")
    body = gm.last()["body"]
    assert body["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather for a city",
         "parameters": {"type": "object",
                        "properties": {"city": {"type": "string", "description": "City name"},
                                       "unit": {"type": "string", "nullable": True, "enum": ["C", "F"]}},
                        "required": ["city"]}},
        {"name": "get_time"},  # an object without properties: no parameters at all
    ]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [orjson.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"tz": "CET"}]
    assert all(c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == 2
    assert calls[0].model_extra["extra_content"] == {"google": {"thought_signature": "c2lnLWFiYw=="}}
    assert not (calls[1].model_extra or {}).get("extra_content")

    # the round trip: the assistant turn as the SDK returned it, then the tool results
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp_c": 21}'})
    messages.append({"role": "tool", "tool_call_id": calls[1].id, "content": "14:05"})
    final = api.chat.completions.create(model="gemini-test", messages=messages, tools=WEATHER_TOOLS,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert final.choices[0].message.content == ANSWER
    body = gm.last()["body"]
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather and time in Paris?"}]},
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLWFiYw=="},
            {"functionCall": {"name": "get_time", "args": {"tz": "CET"}}},
        ]},
        {"role": "user", "parts": [  # parallel results: one turn
            {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
            {"functionResponse": {"name": "get_time", "response": {"content": "14:05"}}},
        ]},
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


def test_streamed_tool_calls(gw, gm):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="gemini-tools", messages=HI, tools=WEATHER_TOOLS, stream=True)
    chunks = list(raw.parse())
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Checking."
    tool_deltas = [t for d in deltas for t in (d.tool_calls or [])]
    assert [(t.index, t.function.name, orjson.loads(t.function.arguments)) for t in tool_deltas] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"tz": "CET"})]
    assert all(t.id and t.id.startswith("call_") and t.type == "function" for t in tool_deltas)
    assert tool_deltas[0].model_extra["extra_content"]["google"]["thought_signature"] == "c2lnLWFiYw=="
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    record = gw.record(raw.headers["x-respan-log-id"])
    assert [c["function"]["name"] for c in record["tool_calls"]] == ["get_weather", "get_time"]
    assert record["prompt_tokens"] == 12 and record["completion_tokens"] == 6


def test_thinking_parts(gw, gm):
    completion = client(gw).chat.completions.create(model="gemini/gm-thinking", messages=HI, reasoning_effort="low")
    assert gm.last()["body"]["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}}
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["reasoning_content"] == THOUGHT
    assert completion.usage.completion_tokens == 15  # candidates 5 + thoughts 10
    assert completion.usage.completion_tokens_details.reasoning_tokens == 10

    chunks = list(client(gw).chat.completions.create(model="gemini/gm-thinking", messages=HI, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == THOUGHT
    assert "".join(d.content or "" for d in deltas) == ANSWER


@pytest.mark.parametrize(("reason", "expected"), [
    ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"), ("OTHER", "stop"),
])
def test_finish_reasons(gw, gm, reason, expected):
    completion = client(gw).chat.completions.create(model=f"gemini/gm-finish-{reason}", messages=HI)
    assert completion.choices[0].finish_reason == expected
    assert completion.choices[0].message.content == ("" if reason == "SAFETY" else "Partial")
    chunks = list(client(gw).chat.completions.create(model=f"gemini/gm-finish-{reason}", messages=HI, stream=True))
    assert chunks[-1].choices[0].finish_reason == expected


def test_prompt_blocked_by_safety(gw, gm):
    raw = client(gw).chat.completions.with_raw_response.create(model="gemini/gm-blocked", messages=HI)
    completion = raw.parse()
    assert len(completion.choices) == 1
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content == ""
    assert completion.usage.prompt_tokens == 7 and completion.usage.completion_tokens == 0
    assert gw.record(raw.headers["x-respan-log-id"])["status_code"] == 200

    chunks = list(client(gw).chat.completions.create(model="gemini/gm-blocked", messages=HI, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "content_filter"]


def test_generation_config_mapping(gw, gm):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
              "additionalProperties": False}
    completion = client(gw).chat.completions.create(
        model="gemini-test", messages=HI, temperature=0.3, top_p=0.9, max_tokens=50, stop=["END", "STOP"], n=2,
        seed=7, presence_penalty=0.5, frequency_penalty=0.25,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        extra_body={"top_k": 40, "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT",
                                                        "threshold": "BLOCK_NONE"}]},
    )
    assert [c.index for c in completion.choices] == [0, 1]
    body = gm.last()["body"]
    assert body["generationConfig"] == {
        "temperature": 0.3, "topP": 0.9, "topK": 40, "seed": 7, "presencePenalty": 0.5, "frequencyPenalty": 0.25,
        "maxOutputTokens": 50, "stopSequences": ["END", "STOP"], "candidateCount": 2,
        "responseMimeType": "application/json",
        "responseSchema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
    }
    assert body["safetySettings"] == [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]

    client(gw).chat.completions.create(model="gemini-test", messages=HI, max_completion_tokens=9,
                                       response_format={"type": "json_object"})
    assert gm.last()["body"]["generationConfig"] == {"maxOutputTokens": 9, "responseMimeType": "application/json"}


@pytest.mark.parametrize(("status", "error_class", "kind"), [
    (400, openai.BadRequestError, "INVALID_ARGUMENT"),
    (429, openai.RateLimitError, "RESOURCE_EXHAUSTED"),
    (500, openai.InternalServerError, "INTERNAL"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_errors_mapped(gw, gm, status, error_class, kind, stream):
    with pytest.raises(error_class) as info:
        client(gw).chat.completions.create(model=f"gemini/gm-status-{status}", messages=HI, stream=stream)
    error = info.value
    assert error.status_code == status
    assert error.body == {"message": f"mock gemini error {status}", "type": kind, "param": None, "code": kind}
    if status == 429:
        assert error.response.headers["retry-after"] == "7"
    record = gw.record(error.response.headers["x-respan-log-id"])
    assert record["status_code"] == status and record["status"] == "error"
    assert record["error_message"] == f"{status}: mock gemini error {status}"


def test_context_length_error_code(gw, gm):
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(model="gemini/gm-context-length", messages=HI)
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["type"] == "INVALID_ARGUMENT"


def test_error_inside_stream(gw, gm):
    api = client(gw)
    raw = api.chat.completions.with_raw_response.create(model="gemini/gm-stream-error", messages=HI, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in raw.parse():
            received.append(chunk)
    assert "overloaded" in info.value.message
    assert info.value.body["code"] == 503 and info.value.body["type"] == "UNAVAILABLE"
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "Hello"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 503 and record["status"] == "error"
    assert "overloaded" in record["error_message"]

    response, data = raw_post(gw, {"model": "gemini/gm-stream-error", "messages": HI, "stream": True})
    payloads = events(data)
    assert orjson.loads(payloads[-1])["error"]["code"] == 503  # the error ends the stream: no [DONE]
    assert b"[DONE]" not in payloads

    response, data = raw_post(gw, {"model": "gemini/gm-stream-error-first", "messages": HI, "stream": True})
    assert [orjson.loads(p) for p in events(data)] == [{"error": {
        "message": "mock quota exceeded", "type": "RESOURCE_EXHAUSTED", "param": None, "code": 429}}]


def test_broken_and_unfinished_streams(gw, gm):
    _, data = raw_post(gw, {"model": "gemini/gm-cut", "messages": HI, "stream": True})
    payloads = events(data)
    assert orjson.loads(payloads[1])["choices"][0]["delta"]["content"] == "Hello"
    assert "broke the stream" in orjson.loads(payloads[-2])["error"]["message"]
    assert payloads[-1] == b"[DONE]"

    _, data = raw_post(gw, {"model": "gemini/gm-no-finish", "messages": HI, "stream": True})
    assert "ended the stream early" in orjson.loads(events(data)[-2])["error"]["message"]


def test_client_leaving_closes_the_gemini_stream(gw, gm):
    stream = client(gw).chat.completions.create(model="gemini/gm-slow", messages=HI, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    closed = gm.wait_for_closed_stream()
    assert closed is not None and closed["model"] == "gm-slow" and closed["sent"] < 100


def test_bad_request_never_reaches_gemini(gw, gm):
    with pytest.raises(openai.BadRequestError) as info:
        client(gw).chat.completions.create(model="gemini-test", messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}])
    assert "video_url" in info.value.response.json()["detail"]  # the gateway's own 400
    with pytest.raises(openai.BadRequestError):
        client(gw).chat.completions.create(model="gemini-test", messages=[
            {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}])
    assert gm.requests == []


def test_not_json_answer_is_a_502(gw, gm):
    with pytest.raises(openai.APIStatusError) as info:
        client(gw).chat.completions.create(model="gemini/gm-not-json", messages=HI)
    assert info.value.status_code == 502


# -- unit: request translation ------------------------------------------------------------


def test_messages_roles_and_merging():
    body = to_gemini({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": ""}, {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": [{"type": "text", "text": "c"}, {"type": "refusal", "refusal": "no"}]},
        {"role": "system", "content": "late system"},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "QUJD", "format": "mp3"}},
                                     {"type": "file", "file": {"file_data": "data:application/pdf;base64,UERG"}}]},
    ]})
    assert body["systemInstruction"] == {"parts": [{"text": "late system"}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "a"}]},
        {"role": "model", "parts": [{"text": "b"}, {"text": "c"}, {"text": "no"}]},
        {"role": "user", "parts": [{"inlineData": {"mimeType": "audio/mp3", "data": "QUJD"}},
                                   {"inlineData": {"mimeType": "application/pdf", "data": "UERG"}}]},
    ]


def test_tool_messages_and_arguments():
    body = to_gemini({"messages": [
        {"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": ""}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "[1, 2]"}]},
        {"role": "tool", "tool_call_id": "b", "content": ' {"x": 1}'},
        {"role": "tool", "tool_call_id": "unknown", "name": "h", "content": "named"},
    ]})
    assert body["contents"] == [
        {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}},
                                    {"functionCall": {"name": "g", "args": {"arguments": "not json"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f", "response": {"content": "[1, 2]"}}},
                                   {"functionResponse": {"name": "g", "response": {"x": 1}}},
                                   {"functionResponse": {"name": "h", "response": {"content": "named"}}}]},
    ]


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"functionCallingConfig": {"mode": "AUTO"}}),
    ("none", {"functionCallingConfig": {"mode": "NONE"}}),
    ("required", {"functionCallingConfig": {"mode": "ANY"}}),
    ({"type": "function", "function": {"name": "get_time"}},
     {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}}),
])
def test_tool_choice(choice, config):
    assert to_gemini({"messages": HI, "tools": WEATHER_TOOLS, "tool_choice": choice})["toolConfig"] == config


def test_native_tools_pass_through_and_unknown_tools_fail():
    body = to_gemini({"messages": HI, "tools": [{"googleSearch": {}}]})
    assert body["tools"] == [{"googleSearch": {}}]
    with pytest.raises(BadRequest):
        to_gemini({"messages": HI, "tools": [{"type": "custom", "custom": {"name": "x"}}]})
    with pytest.raises(BadRequest):
        to_gemini({"messages": HI, "tools": WEATHER_TOOLS, "tool_choice": "sometimes"})


def test_clean_schema():
    schema = {
        "$schema": "x", "$id": "y", "type": "object", "additionalProperties": False, "title": "T",
        "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string", "format": "uuid"},
                                                             "when": {"type": "string", "format": "date-time"}}}},
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1, "uniqueItems": True},
            "kind": {"const": "order"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "either": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
            "count": {"type": "integer", "exclusiveMinimum": 0, "minimum": 1, "examples": [3]},
            "level": {"enum": [1, 2]},
            "opts": {"type": "object", "properties": {}, "example": {}, "default": {}},
            "meta": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}]},
        },
        "required": ["items", "ghost"],
    }
    assert clean_schema(schema) == {
        "type": "object", "title": "T",
        "properties": {
            "items": {"type": "array", "minItems": 1,
                      "items": {"type": "object", "properties": {"sku": {"type": "string"},
                                                                 "when": {"type": "string", "format": "date-time"}}}},
            "kind": {"enum": ["order"], "type": "string"},
            "note": {"nullable": True, "type": "string"},
            "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "count": {"type": "integer", "minimum": 1},
            "level": {},
            "opts": {"type": "object", "default": {}},
            "meta": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        },
        "required": ["items"],
    }
    recursive = {"$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
                 "$ref": "#/$defs/Node"}
    cleaned = clean_schema(recursive)  # cut at a fixed depth, not an endless recursion
    assert cleaned["properties"]["child"]["type"] == "object"


def test_reasoning_effort_and_native_generation_config():
    config = to_gemini({"messages": HI, "reasoning_effort": "none"})["generationConfig"]
    assert config == {"thinkingConfig": {"thinkingBudget": 0}}
    config = to_gemini({"messages": HI, "reasoning_effort": "high", "temperature": 1,
                        "generationConfig": {"thinkingConfig": {"thinkingLevel": "high"}, "responseModalities": ["TEXT"]}
                        })["generationConfig"]
    assert config == {"temperature": 1, "responseModalities": ["TEXT"],
                      "thinkingConfig": {"thinkingBudget": 24576, "includeThoughts": True, "thinkingLevel": "high"}}


def test_guess_mime():
    assert guess_mime("https://x.test/a/b.PNG?q=1#f") == "image/png"
    assert guess_mime("https://x.test/a.pdf") == "application/pdf"
    assert guess_mime("https://x.test/a.v1/photo") == "image/jpeg"
    assert guess_mime("gs://bucket/clip.mp4") == "video/mp4"


def test_bad_content():
    for content in ([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}], [{"type": "nope"}], 42):
        with pytest.raises(BadRequest):
            to_gemini({"messages": [{"role": "user", "content": content}]})
    with pytest.raises(BadRequest):
        to_gemini({"messages": [{"role": "wizard", "content": "x"}]})
    # a data: URL that is not base64 is encoded
    part = to_gemini({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/svg+xml,%3Csvg%3E"}}]}]})["contents"][0]["parts"][0]
    assert part == {"inlineData": {"mimeType": "image/svg+xml", "data": base64.b64encode(b"<svg>").decode()}}


def test_urls_and_headers():
    adapter = GeminiGenerateContent(Provider(id="gemini", protocol="gemini", base_url="https://g.test/",
                                             headers={"x-extra": "1"}), Timeouts(), UpstreamClient())
    from proxy.call import Target

    target = Target(provider="gemini", protocol="gemini", model="gemini-2.5-flash", api_key="k")
    assert adapter.url(target, False) == "https://g.test/v1beta/models/gemini-2.5-flash:generateContent"
    assert adapter.url(target, True) == "https://g.test/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    versioned = Target(provider="gemini", protocol="gemini", model="models/x", base_url="https://p.test/v1")
    assert adapter.url(versioned, False) == "https://p.test/v1/models/x:generateContent"
    tuned = Target(provider="gemini", protocol="gemini", model="tunedModels/my model")
    assert adapter.url(tuned, False) == "https://g.test/v1beta/tunedModels/my%20model:generateContent"
    assert adapter.request_headers(target) == {"Content-Type": "application/json", "x-extra": "1",
                                               "x-goog-api-key": "k"}
    custom = Target(provider="gemini", protocol="gemini", model="m", api_key="c", base_url="https://other.test",
                    custom_credential=True)
    assert adapter.request_headers(custom) == {"Content-Type": "application/json", "x-goog-api-key": "c"}
    asyncio.run(adapter.upstream.close())


# -- unit: response translation -----------------------------------------------------------


def test_from_gemini_shapes():
    out = from_gemini({"candidates": [
        {"content": {"parts": [{"text": "deep", "thought": True}, {"text": "A"}, {"text": "B"},
                               {"functionCall": {"name": "f", "args": {"x": 1}, "id": "given-id"}}]},
         "finishReason": "STOP"},
        {"index": 1, "content": {"parts": [{"text": "cut"}]}, "finishReason": "MAX_TOKENS"},
        {"index": 2, "finishReason": "SPII"},
        {"index": 3, "content": {"parts": [{"text": "?"}]}, "finishReason": "MALFORMED_FUNCTION_CALL"},
    ], "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}, "gemini-x")
    assert out["model"] == "gemini-x"
    assert out["id"].startswith("chatcmpl-")
    first = out["choices"][0]
    assert first["message"] == {"role": "assistant", "content": "AB", "reasoning_content": "deep",
                                "tool_calls": [{"id": "given-id", "type": "function",
                                                "function": {"name": "f", "arguments": '{"x":1}'}}]}
    assert [c["finish_reason"] for c in out["choices"]] == ["tool_calls", "length", "content_filter", "stop"]
    assert out["choices"][2]["message"]["content"] == ""
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                            "prompt_tokens_details": {"cached_tokens": 0}}


def test_tool_call_ids_are_unique_per_answer():
    data = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f"}}, {"functionCall": {"name": "g"}}]},
                            "finishReason": "STOP"}]}
    one = [c["id"] for c in from_gemini(data, "m")["choices"][0]["message"]["tool_calls"]]
    two = [c["id"] for c in from_gemini(data, "m")["choices"][0]["message"]["tool_calls"]]
    assert one[0].startswith("call_0_") and one[1].startswith("call_1_")
    assert not set(one) & set(two)
    assert from_gemini(data, "m")["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"


def test_usage_mapping():
    assert to_usage({"promptTokenCount": 100, "candidatesTokenCount": 20, "thoughtsTokenCount": 30,
                     "cachedContentTokenCount": 40, "totalTokenCount": 150}) == {
        "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 40}, "completion_tokens_details": {"reasoning_tokens": 30}}
    assert to_usage(None) is None


def test_error_body_shapes():
    gemini = orjson.dumps({"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}})
    assert orjson.loads(error_body(403, gemini)) == {"error": {
        "message": "denied", "type": "PERMISSION_DENIED", "param": None, "code": "PERMISSION_DENIED"}}
    as_list = orjson.dumps([{"error": {"code": 404, "message": "no model", "status": "NOT_FOUND"}}])
    assert orjson.loads(error_body(404, as_list))["error"]["type"] == "NOT_FOUND"
    assert orjson.loads(error_body(503, b"upstream connect error")) == {"error": {
        "message": "upstream connect error", "type": "UNAVAILABLE", "param": None, "code": "UNAVAILABLE"}}
    assert orjson.loads(error_body(418, b""))["error"] == {"message": "Gemini returned HTTP 418", "type": "UNKNOWN",
                                                           "param": None, "code": "UNKNOWN"}


def _sse(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data)


def test_stream_translator_multiple_candidates_and_usage():
    t = StreamTranslator("gemini-x")
    out = t.event(_sse({"candidates": [{"content": {"parts": [{"text": "a"}]}},
                                       {"index": 1, "content": {"parts": [{"text": "b"}]}}],
                        "usageMetadata": {"promptTokenCount": 5}}))
    out += t.event(_sse({"candidates": [{"content": {"parts": [{"text": "c"}]}, "finishReason": "STOP"},
                                        {"index": 1, "finishReason": "MAX_TOKENS"}],
                         "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3}}))
    out.append(t.finish())
    payloads = events(b"".join(out))
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert chunks[-1] == {**chunks[-1], "choices": [], "usage": {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 0}}}
    by_index: dict[int, list[Any]] = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            by_index.setdefault(choice["index"], []).append((choice["delta"], choice["finish_reason"]))
    assert by_index[0] == [({"role": "assistant", "content": ""}, None), ({"content": "a"}, None),
                           ({"content": "c"}, None), ({}, "stop")]
    assert by_index[1] == [({"role": "assistant", "content": ""}, None), ({"content": "b"}, None), ({}, "length")]


def test_stream_translator_unfinished_and_errors():
    t = StreamTranslator("m")
    t.event(_sse({"candidates": [{"content": {"parts": [{"text": "a"}]}}]}))
    assert t.finish() == b""  # no finishReason, no usage: no [DONE], the relay calls it cut short
    t = StreamTranslator("m")
    out = t.event(_sse({"error": {"code": "weird", "message": "boom"}}))
    assert orjson.loads(events(b"".join(out))[0]) == {"error": {"message": "boom", "type": "UNKNOWN", "param": None,
                                                                "code": 502}}
    assert t.event(_sse({"candidates": [{"content": {"parts": [{"text": "late"}]}}]})) == []
    assert t.finish() == b""
    assert StreamTranslator("m").event(b"not json") == []
