"""The Bedrock Converse adapter: OpenAI chat in, Converse (SigV4-signed) upstream, OpenAI chat out.

Unit tests of SigV4 (against AWS's published test vectors), of the event-stream decoder and of
the translation functions, then end to end through a real gateway process against
tests/mock_bedrock.py (which verifies every signature) with the official `openai` SDK.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import yarl

from proxy.call import Target
from proxy.errors import BadRequest
from proxy.providers import sigv4
from proxy.providers.bedrock import (
    BedrockConverse,
    StreamTranslator,
    credentials_for,
    error_reply_body,
    finish_reason,
    from_converse,
    model_path,
    region_of,
    split_key,
    to_converse,
    usage_from_converse,
)
from proxy.providers.eventstream import EventStreamDecoder, EventStreamError, encode_message
from proxy.settings import Provider, Timeouts
from proxy.upstream import UpstreamClient
from tests.conftest import KEY, WEATHER_TOOLS, GatewayProcess, module_gateway, server_fixtures
from tests.conftest import openai_client as client
from tests.mock_bedrock import SIGNATURE, TEXT, THOUGHT, TOOLS, MockBedrock, event, exception, frame

HI = [{"role": "user", "content": "hi"}]
PRICES = {"input": 3.0, "output": 15.0, "cached_input": 0.3}
HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
PNG = "iVBORw0KGgo="

# AWS's example credentials, used by its SigV4 documentation and test suite
EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# -- SigV4 -----------------------------------------------------------------------------------


def test_sigv4_signing_key_vector():
    # AWS General Reference, "Examples of how to derive a signing key for Signature Version 4"
    # (docs.aws.amazon.com/general/latest/gr/signature-v4-examples.html): secret, 20120215,
    # us-east-1, iam -> this kSigning.
    key = sigv4.signing_key(EXAMPLE_SECRET, "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


@pytest.mark.parametrize(("url", "expected"), [
    # AWS Signature Version 4 Test Suite (docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html),
    # groups get-vanilla and get-vanilla-query-order-key-case: AKIDEXAMPLE, 20150830T123600Z,
    # us-east-1, service "service", host example.amazonaws.com.
    ("https://example.amazonaws.com/", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    ("https://example.amazonaws.com/?Param2=value2&Param1=value1",
     "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
])
def test_sigv4_test_suite_vectors(url, expected):
    headers = sigv4.sign_headers("GET", url, {}, b"", access_key="AKIDEXAMPLE", secret_key=EXAMPLE_SECRET,
                                 region="us-east-1", service="service", amz_date="20150830T123600Z")
    assert headers["host"] == "example.amazonaws.com"
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={expected}")


def test_sigv4_canonical_request_shape():
    request, signed = sigv4.canonical_request(
        "post", "/model/a:b/converse", "", {"X-Amz-Date": "20150830T123600Z", "Host": "h", "Content-Type": " a  b "},
        EMPTY_SHA256)
    assert signed == "content-type;host;x-amz-date"
    assert request == ("POST\n/model/a%3Ab/converse\n\ncontent-type:a b\nhost:h\nx-amz-date:20150830T123600Z\n\n"
                       f"content-type;host;x-amz-date\n{EMPTY_SHA256}")


def test_sigv4_session_token_and_host_port():
    headers = sigv4.sign_headers("POST", "http://127.0.0.1:8123/x", {"content-type": "application/json"}, b"{}",
                                 access_key="AK", secret_key="s", region="eu-west-1", service="bedrock",
                                 session_token="tok")
    assert headers["host"] == "127.0.0.1:8123"
    assert headers["x-amz-security-token"] == "tok"
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token," in headers["authorization"]
    assert sigv4.host_header("https://bedrock-runtime.us-east-1.amazonaws.com:443/") == \
        "bedrock-runtime.us-east-1.amazonaws.com"


@pytest.mark.parametrize(("model", "path", "canonical"), [
    (HAIKU, f"/model/{HAIKU}/converse", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"),
    ("arn:aws:bedrock:us-east-1:123:inference-profile/us.x:0",
     "/model/arn:aws:bedrock:us-east-1:123:inference-profile%2Fus.x:0/converse",
     "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123%3Ainference-profile%252Fus.x%3A0/converse"),
])
def test_model_path_is_stable_on_the_wire_and_double_encoded_for_signing(model, path, canonical):
    assert model_path(model, stream=False) == path
    assert yarl.URL("http://h" + path).raw_path == path  # what aiohttp sends is what was signed
    assert sigv4.canonical_uri(path) == canonical
    assert model_path(model, stream=True).endswith("/converse-stream")


# -- event stream ----------------------------------------------------------------------------


def sample_frames() -> bytes:
    return (encode_message({":event-type": "messageStart", ":message-type": "event"}, b'{"role":"assistant"}')
            + event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "héllo"}})
            + encode_message({}, b"")
            + exception("throttlingException", "slow down"))


def test_eventstream_decodes_with_a_split_at_every_byte():
    data = sample_frames()
    whole = EventStreamDecoder().feed(data)
    assert [h.get(":event-type") or h.get(":exception-type") for h, _ in whole] == [
        "messageStart", "contentBlockDelta", None, "throttlingException"]
    assert orjson.loads(whole[1][1])["delta"]["text"] == "héllo"
    assert whole[2] == ({}, b"")
    for cut in range(1, len(data)):
        decoder = EventStreamDecoder()
        assert decoder.feed(data[:cut]) + decoder.feed(data[cut:]) == whole, cut
        assert decoder.pending == 0
    decoder = EventStreamDecoder()
    assert [m for i in range(len(data)) for m in decoder.feed(data[i:i + 1])] == whole


def test_eventstream_encoders_agree():
    headers = {":event-type": "metadata", ":content-type": "application/json", ":message-type": "event"}
    assert encode_message(headers, b'{"a":1}') == frame(headers, b'{"a":1}')


@pytest.mark.parametrize("position", [5, 10, 20, -2])
def test_eventstream_crc_errors(position):
    data = bytearray(encode_message({":event-type": "x"}, b"payload"))
    data[position] ^= 0xFF
    with pytest.raises(EventStreamError):
        EventStreamDecoder().feed(bytes(data))


def test_eventstream_good_messages_before_a_broken_one_are_kept():
    good = encode_message({":event-type": "a"}, b"1") + encode_message({":event-type": "b"}, b"2")
    bad = bytearray(encode_message({":event-type": "c"}, b"3"))
    bad[-1] ^= 0xFF
    decoder = EventStreamDecoder()
    assert [p for _, p in decoder.feed(good + bytes(bad))] == [b"1", b"2"]  # the break is held back...
    with pytest.raises(EventStreamError):
        decoder.close()  # ...and raised at the end of the body
    with pytest.raises(EventStreamError):
        decoder.feed(b"")  # or by the next read


def test_eventstream_typed_headers():
    raw = (b"\x01a\x00" + b"\x01b\x01" + b"\x01c\x02\x05" + b"\x01d\x03\x00\x07" + b"\x01e\x04\x00\x00\x00\x09"
           + b"\x01f\x05" + (10).to_bytes(8, "big") + b"\x01g\x06\x00\x02xy" + b"\x01h\x08" + (3).to_bytes(8, "big")
           + b"\x01i\x09" + bytes(range(16)))
    from proxy.providers.eventstream import decode_headers
    assert decode_headers(raw) == {"a": True, "b": False, "c": 5, "d": 7, "e": 9, "f": 10, "g": b"xy", "h": 3,
                                   "i": bytes(range(16))}


# -- translation: request --------------------------------------------------------------------


def test_to_converse_full_request():
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Cite sources.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": "Weather?"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                         {"type": "text", "text": "  "}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "t2", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "t2", "content": [{"type": "text", "text": "noon"}]},
            {"role": "user", "content": "Thanks"},
        ],
        "max_tokens": 100, "max_completion_tokens": 200, "temperature": 0.2, "top_p": 0.9, "top_k": 5,
        "stop": "END", "tools": WEATHER_TOOLS, "tool_choice": "required",
        "n": 1, "seed": 3, "presence_penalty": 0.1, "user": "u1", "stream_options": {"include_usage": True},
    }
    assert to_converse(body) == {
        "system": [{"text": "Be brief."}, {"text": "Cite sources."}, {"cachePoint": {"type": "default"}}],
        "messages": [
            {"role": "user", "content": [{"text": "Weather?"},
                                         {"image": {"format": "png", "source": {"bytes": PNG}}}]},
            {"role": "assistant", "content": [
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Paris"}}},
                {"toolUse": {"toolUseId": "t2", "name": "get_time", "input": {}}}]},
            {"role": "user", "content": [
                {"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}},
                {"toolResult": {"toolUseId": "t2", "content": [{"text": "noon"}]}},
                {"text": "Thanks"}]},
        ],
        "inferenceConfig": {"maxTokens": 200, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]},
        "toolConfig": {"tools": [
            {"toolSpec": {"name": "get_weather", "description": "Weather in a city", "inputSchema": {
                "json": WEATHER_TOOLS[0]["function"]["parameters"]}}},
            {"toolSpec": {"name": "get_time", "inputSchema": {"json": WEATHER_TOOLS[1]["function"]["parameters"]}}}],
            "toolChoice": {"any": {}}},
        "additionalModelRequestFields": {"top_k": 5},
    }


@pytest.mark.parametrize(("choice", "expected"), [
    (None, {"auto": {}}), ("auto", {"auto": {}}), ("required", {"any": {}}),
    ({"type": "function", "function": {"name": "get_time"}}, {"tool": {"name": "get_time"}}),
])
def test_tool_choice(choice, expected):
    out = to_converse({"messages": HI, "tools": WEATHER_TOOLS, "tool_choice": choice})
    assert out["toolConfig"]["toolChoice"] == expected


def test_tool_choice_none():
    assert "toolConfig" not in to_converse({"messages": HI, "tools": WEATHER_TOOLS, "tool_choice": "none"})
    history = [{"role": "assistant", "tool_calls": [{"id": "t", "function": {"name": "get_time", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "t", "content": "noon"}]
    out = to_converse({"messages": HI + history, "tools": WEATHER_TOOLS, "tool_choice": "none"})
    assert "toolChoice" not in out["toolConfig"] and len(out["toolConfig"]["tools"]) == 2


def test_documents_and_minimal_request():
    assert to_converse({"messages": HI}) == {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
    part = {"type": "file", "file": {"filename": "report.v1.pdf", "file_data": "data:application/pdf;base64,JVBE"}}
    out = to_converse({"messages": [{"role": "user", "content": [part]}]})
    assert out["messages"][0]["content"] == [
        {"document": {"format": "pdf", "name": "report-v1", "source": {"bytes": "JVBE"}}}]


@pytest.mark.parametrize("content", [
    [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
    [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}],
    [{"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}],
    [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
])
def test_untranslatable_content_is_a_400(content):
    with pytest.raises(BadRequest, match="Bedrock"):
        to_converse({"messages": [{"role": "user", "content": content}]})


# -- translation: response -------------------------------------------------------------------


def test_from_converse():
    data = {"output": {"message": {"role": "assistant", "content": [
        {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "s"}}},
        {"text": "Let me "}, {"text": "check."},
        {"toolUse": {"toolUseId": "tu1", "name": "get_weather", "input": {"city": "Paris"}}}]}},
        "stopReason": "tool_use",
        "usage": {"inputTokens": 5, "outputTokens": 7, "totalTokens": 312, "cacheReadInputTokens": 200,
                  "cacheWriteInputTokens": 100}}
    out = from_converse(data, "m")
    assert out["object"] == "chat.completion" and out["model"] == "m"
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["choices"][0]["message"] == {
        "role": "assistant", "content": "Let me check.", "reasoning_content": "hmm",
        "thinking_blocks": [{"type": "thinking", "thinking": "hmm", "signature": "s"}],
        "tool_calls": [{"id": "tu1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    usage = out["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (305, 7, 312)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 200, "cache_creation_tokens": 100}


def test_thinking_request_and_signed_blocks_back():
    out = to_converse({"messages": HI, "reasoning_effort": "medium"})
    assert out["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 4096}}
    assert out["inferenceConfig"] == {"maxTokens": 4096 + 4096}  # above the budget, as Claude requires
    given = {"type": "enabled", "budget_tokens": 2000}
    out = to_converse({"messages": HI, "thinking": given, "max_tokens": 3000})
    assert out["additionalModelRequestFields"]["thinking"] == given and out["inferenceConfig"]["maxTokens"] == 3000
    assert "inferenceConfig" not in to_converse({"messages": HI})  # no limit given, no thinking: Bedrock's own
    with pytest.raises(BadRequest, match="reasoning_effort"):
        to_converse({"messages": HI, "reasoning_effort": "extreme"})
    # multi-turn with tools: the signed blocks of the last answer go back first in its turn
    answer = {"role": "assistant", "content": None, "reasoning_content": "hmm",
              "thinking_blocks": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
                                  {"type": "redacted_thinking", "data": "b64=="}],
              "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    turns = to_converse({"messages": [*HI, answer, {"role": "tool", "tool_call_id": "t1", "content": "ok"}],
                         "thinking": given})["messages"]
    assert turns[1]["content"] == [
        {"reasoningContent": {"reasoningText": {"text": "hmm", "signature": "sig"}}},
        {"reasoningContent": {"redactedContent": "b64=="}},
        {"toolUse": {"toolUseId": "t1", "name": "f", "input": {}}}]


def test_stream_translator_thinking():
    translator = StreamTranslator("m")
    messages = [event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "Let "}}}),
                event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "me."}}}),
                event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "sg"}}}),
                event("contentBlockStop", {"contentBlockIndex": 0}),
                event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "Hi"}})]
    out = translator.feed(EventStreamDecoder().feed(b"".join(messages)))
    deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert [d.get("reasoning_content") for d in deltas[1:3]] == ["Let ", "me."]
    assert deltas[3] == {"thinking_blocks": [{"type": "thinking", "thinking": "Let me.", "signature": "sg"}]}
    assert deltas[4] == {"content": "Hi"}


@pytest.mark.parametrize(("reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("guardrail_intervened", "content_filter"), ("content_filtered", "content_filter"), ("other", "stop"),
    (None, None)])
def test_finish_reasons(reason, finish):
    assert finish_reason(reason) == finish


def test_usage_without_cache():
    assert usage_from_converse({"inputTokens": 3, "outputTokens": 4})["total_tokens"] == 7
    assert usage_from_converse(None)["prompt_tokens"] == 0


def test_error_reply_body():
    body = orjson.loads(error_reply_body(429, b'{"message":"Too many requests"}', "ThrottlingException:http://x/"))
    assert body == {"error": {"message": "Too many requests", "type": "rate_limit_error", "param": None,
                              "code": "ThrottlingException"}}
    body = orjson.loads(error_reply_body(400, b'{"message":"Input is too long for requested model."}', None))
    assert body["error"]["code"] == "context_length_exceeded"
    assert orjson.loads(error_reply_body(502, b"<html>bad gateway</html>", None))["error"]["message"] == \
        "<html>bad gateway</html>"


def sse(data: bytes) -> list[Any]:
    return [orjson.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]"
            for line in data.split(b"\n\n") if line.startswith(b"data: ")]


def test_stream_translator():
    decoder, translator = EventStreamDecoder(), StreamTranslator("m")
    events = MockBedrock().events("x-tools")
    out = b"".join(translator.feed(decoder.feed(e)) for e in events)
    chunks = sse(out)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["prompt_tokens"] == 12
    assert chunks[-3]["choices"][0]["finish_reason"] == "tool_calls"
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks[1:-2]:
        for call in chunk["choices"][0]["delta"].get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"id": "", "args": ""})
            entry["id"] += call.get("id") or ""
            entry["args"] += call["function"].get("arguments") or ""
    assert [(c["id"], orjson.loads(c["args"])) for c in calls.values()] == [(i, a) for i, _, a in TOOLS]
    assert translator.done and translator.finish() == b""


def test_stream_translator_exception_event():
    translator = StreamTranslator("m")
    events = MockBedrock().events("x-throttled")
    out = sse(translator.feed(EventStreamDecoder().feed(b"".join(events))))
    assert out[-1] == {"error": {"message": "Too many requests, please wait before trying again.",
                                 "type": "throttlingException", "param": None, "code": 429}}
    assert translator.failed and "[DONE]" not in out


# -- credentials and region ------------------------------------------------------------------


def target(**kwargs: Any) -> Target:
    return Target(provider="bedrock", protocol="bedrock", model=HAIKU, **kwargs)


def test_credentials_and_region():
    aws = "https://bedrock-runtime.eu-central-1.amazonaws.com"
    assert region_of(aws) == "eu-central-1" and region_of("http://127.0.0.1:1") is None
    assert split_key("AK:SK") == ("AK", "SK", None) and split_key("AK:SK:TOK") == ("AK", "SK", "TOK")
    assert split_key("nokey") is None and split_key(None) is None
    creds = credentials_for(target(api_key="AK:SK"), aws)
    assert (creds.access_key, creds.secret_key, creds.session_token, creds.region) == ("AK", "SK", None, "eu-central-1")
    custom = {"aws_access_key_id": "AK2", "aws_secret_access_key": "SK2", "aws_session_token": "T",
              "aws_region_name": "ap-south-1"}
    creds = credentials_for(target(api_key="AK:SK", credentials=custom, custom_credential=True), aws)
    assert (creds.access_key, creds.secret_key, creds.session_token, creds.region) == ("AK2", "SK2", "T", "ap-south-1")
    assert credentials_for(target(api_key="AK:SK"), "http://127.0.0.1:1").region == "us-east-1"
    assert credentials_for(target(), aws) is None

    adapter = BedrockConverse(Provider(id="bedrock", protocol="bedrock", base_url=aws), Timeouts(), UpstreamClient())
    assert adapter.base_url(target(), None) == aws
    assert adapter.base_url(target(), "us-west-2") == "https://bedrock-runtime.us-west-2.amazonaws.com"
    bare = BedrockConverse(Provider(id="b", protocol="bedrock"), Timeouts(), UpstreamClient())
    assert bare.base_url(target(), "eu-west-1") == "https://bedrock-runtime.eu-west-1.amazonaws.com"


# -- end to end ------------------------------------------------------------------------------


bedrock_mock, bmock = server_fixtures(MockBedrock, "bedrock_mock", "bmock")


@pytest.fixture(scope="module")
def gw(mock_upstream, bedrock_mock: MockBedrock, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    yield from module_gateway(
        tmp_path_factory, "gateway-bedrock", mock_upstream, pipeline=["auth", "routing", "credentials"],
        extra_providers=[
            {"id": "bedrock", "protocol": "bedrock", "base_url": bedrock_mock.base_url, "api_key": "AKIDEXAMPLE:secret"},
            {"id": "bedrock-wrong", "protocol": "bedrock", "base_url": bedrock_mock.base_url,
             "api_key": "AKIDEXAMPLE:not-the-secret"},
        ],
        extra_models=[
            {"name": "haiku", "provider": "bedrock", "model": HAIKU, "prices": PRICES},
            {"name": "haiku-cache", "provider": "bedrock", "model": "anthropic.claude-cache-v1:0", "prices": PRICES},
            {"name": "haiku-tools", "provider": "bedrock", "model": "anthropic.claude-tools-v1:0", "prices": PRICES},
            {"name": "haiku-throttled", "provider": "bedrock", "model": "anthropic.claude-throttled", "prices": PRICES},
            {"name": "haiku-429", "provider": "bedrock", "model": "anthropic.claude-status-429"},
            {"name": "haiku-thinking", "provider": "bedrock", "model": "anthropic.claude-thinking-v1:0",
             "prices": PRICES},
            {"name": "haiku-wrong", "provider": "bedrock-wrong", "model": HAIKU},
        ],
    )


def test_e2e_text_non_stream(gw, bmock):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="haiku", messages=[{"role": "system", "content": "Be brief."}, *HI], max_tokens=50)
    completion = raw.parse()
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 6)
    request = bmock.last()
    assert request["path"] == f"/model/{HAIKU}/converse" and request["model"] == HAIKU
    assert request["signer"] == {"access_key": "AKIDEXAMPLE", "region": "us-east-1", "session_token": None}
    assert request["body"] == {"messages": [{"role": "user", "content": [{"text": "hi"}]}],
                               "system": [{"text": "Be brief."}], "inferenceConfig": {"maxTokens": 50}}
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["status_code"] == 200
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx((12 * 3.0 + 6 * 15.0) / 1e6)


def test_e2e_text_stream_with_usage(gw, bmock):
    raw = client(gw).chat.completions.with_raw_response.create(
        model="haiku", messages=HI, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == 12 and chunks[-1].usage.completion_tokens == 6
    assert bmock.last()["path"].endswith("/converse-stream")
    assert bmock.last()["headers"]["Accept"] == "application/vnd.amazon.eventstream"
    record = gw.record(raw.headers["x-respan-log-id"])
    assert record["stream"] is True and record["status_code"] == 200
    assert (record["prompt_tokens"], record["completion_tokens"]) == (12, 6)
    assert record["cost"] == pytest.approx((12 * 3.0 + 6 * 15.0) / 1e6)
    assert record["completion_message"] == {"role": "assistant", "content": TEXT}


def test_e2e_thinking(gw, bmock):
    message = client(gw).chat.completions.create(model="haiku-thinking", messages=HI,
                                                 reasoning_effort="low").choices[0].message
    assert message.content == TEXT
    extra = message.model_extra
    assert extra["reasoning_content"] == THOUGHT
    assert extra["thinking_blocks"] == [{"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE}]
    assert bmock.last()["body"]["additionalModelRequestFields"]["thinking"] == {"type": "enabled",
                                                                               "budget_tokens": 1024}
    chunks = list(client(gw).chat.completions.create(model="haiku-thinking", messages=HI, stream=True,
                                                     reasoning_effort="low"))
    deltas = [c.choices[0].delta.model_extra for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == THOUGHT
    assert [b for d in deltas for b in d.get("thinking_blocks") or []] == extra["thinking_blocks"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    # the next turn sends the signed block back, as Claude needs with tools
    history = [*HI, {"role": "assistant", "content": TEXT, "thinking_blocks": extra["thinking_blocks"]},
               {"role": "user", "content": "and?"}]
    client(gw).chat.completions.create(model="haiku-thinking", messages=history, reasoning_effort="low")
    assert bmock.last()["body"]["messages"][1]["content"][0] == {
        "reasoningContent": {"reasoningText": {"text": THOUGHT, "signature": SIGNATURE}}}


def test_e2e_cache_usage_stream(gw, bmock):
    chunks = list(client(gw).chat.completions.create(
        model="haiku-cache", messages=HI, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (305, 6)
    assert usage.prompt_tokens_details.cached_tokens == 200


def test_e2e_tools_non_stream(gw, bmock):
    completion = client(gw).chat.completions.create(model="haiku-tools", messages=HI, tools=WEATHER_TOOLS)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in message.tool_calls] == TOOLS
    assert bmock.last()["body"]["toolConfig"]["toolChoice"] == {"auto": {}}


def test_e2e_tools_stream(gw, bmock):
    chunks = list(client(gw).chat.completions.create(model="haiku-tools", messages=HI, tools=WEATHER_TOOLS,
                                                     stream=True))
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, ["", "", ""])
            entry[0] += call.id or ""
            entry[1] += (call.function.name or "") if call.function else ""
            entry[2] += (call.function.arguments or "") if call.function else ""
    assert [(i, n, orjson.loads(a)) for i, n, a in calls.values()] == TOOLS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_e2e_wrong_secret_is_a_403(gw, bmock):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client(gw).chat.completions.create(model="haiku-wrong", messages=HI)
    error = caught.value.body
    assert "signature we calculated does not match" in error["message"]
    assert error["code"] == "InvalidSignatureException"
    assert bmock.last()["signer"] is None


def test_e2e_error_status_passes_through(gw, bmock):
    with pytest.raises(openai.RateLimitError) as caught:
        client(gw).chat.completions.create(model="haiku-429", messages=HI)
    assert caught.value.body["code"] == "ThrottlingException"


def test_e2e_exception_inside_stream(gw, bmock):
    response = httpx.post(f"{gw.url}/api/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "haiku-throttled", "messages": HI, "stream": True}, timeout=10)
    events = sse(response.content)
    assert any(e != "[DONE]" and e.get("choices") and e["choices"][0]["delta"].get("content") for e in events)
    assert events[-1]["error"]["type"] == "throttlingException"


def test_e2e_customer_credentials(gw, bmock):
    creds = {"bedrock": {"aws_access_key_id": "AKIDCUSTOMER", "aws_secret_access_key": "customer-secret",
                         "aws_session_token": "session-tok", "aws_region_name": "eu-west-1"}}
    completion = client(gw).chat.completions.create(model="haiku", messages=HI,
                                                    extra_body={"customer_credentials": creds})
    assert completion.choices[0].message.content == TEXT
    assert bmock.last()["signer"] == {"access_key": "AKIDCUSTOMER", "region": "eu-west-1",
                                      "session_token": "session-tok"}
    # the same keys with a wrong secret: the mock refuses the signature
    creds["bedrock"]["aws_secret_access_key"] = "wrong"
    with pytest.raises(openai.PermissionDeniedError):
        client(gw).chat.completions.create(model="haiku", messages=HI, extra_body={"customer_credentials": creds})


def test_mock_signature_covers_the_body(bmock):
    """The mock itself: a body changed after signing is refused."""
    bedrock_mock = bmock
    url = bedrock_mock.base_url + model_path(HAIKU, False)
    body = orjson.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]})
    headers = sigv4.sign_headers("POST", url, {"content-type": "application/json"}, body, access_key="AKIDEXAMPLE",
                                 secret_key="secret", region="us-east-1", service="bedrock")
    assert httpx.post(url, content=body, headers=headers).status_code == 200
    tampered = body.replace(b"hi", b"ho")
    response = httpx.post(url, content=tampered, headers=headers)
    assert response.status_code == 403
    assert "signature we calculated does not match" in response.json()["message"]
