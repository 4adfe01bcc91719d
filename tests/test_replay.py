"""proxy/replay.py: a cached answer served in the other delivery mode.

Round trips for every format; the streams it writes read back with the official SDKs (openai,
anthropic, google-genai) from a loopback server; and the streams the mock providers send
(tests/mock_upstream.py, mock_anthropic.py, mock_gemini.py) turned into their whole answers, or
into None when they are cut short or carry an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from aiohttp import web
from google import genai
from google.genai import types

from proxy.replay import stream_from_whole, whole_from_stream
from tests.conftest import add_tool_call_deltas, server_fixtures, serving
from tests.mock_anthropic import MockAnthropic
from tests.mock_gemini import MockGemini
from tests.mock_server import MockServer
from tests.mock_upstream import MockUpstream

CHAT = ("openai", "chat")
ANTHROPIC = ("anthropic", "anthropic.messages")
RESPONSES = ("responses", "responses")
GEMINI = ("gemini", "gemini.generateContent")
GEMINI_STREAM = ("gemini", "gemini.streamGenerateContent")

# -- cached whole answers -------------------------------------------------------------------------

CHAT_USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
              "prompt_tokens_details": {"cached_tokens": 0}}


def chat(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_123", "choices": choices, "usage": CHAT_USAGE, **extra}


def chat_choice(message: dict[str, Any], finish: str = "stop", index: int = 0) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": None, **message}, "finish_reason": finish,
            "logprobs": None}


CHAT_TEXT = chat([chat_choice({"content": "Hello! How can I help you today?"})])
CHAT_N2 = chat([chat_choice({"content": "Roses are red."}), chat_choice({"content": "Violets are"}, "length", 1)])
CHAT_TOOLS = chat([chat_choice({"tool_calls": [
    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
]}, "tool_calls")])
CHAT_REASONING = chat([chat_choice({"content": "42.", "reasoning_content": "Six times seven."})])
CHAT_REFUSAL = chat([chat_choice({"refusal": "I can't help with that."})])
CHAT_LOGPROBS = chat([{**chat_choice({"content": "Hi"}), "logprobs": {"content": [
    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}], "refusal": None}}])


def claude(content: list[dict[str, Any]], stop: str = "end_turn") -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 25, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 5,
                      "output_tokens": 40}}


CLAUDE_TEXT = claude([{"type": "text", "text": "Hello from Claude."}])
CLAUDE_TOOLS = claude([
    {"type": "text", "text": "Let me look that up."},
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "units": ["c", "f"]}},
    {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
], "tool_use")
CLAUDE_THINKING = claude([
    {"type": "thinking", "thinking": "The user greets me.\nI answer briefly.", "signature": "EqQBCkYIBxgCKkBz"},
    {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
    {"type": "text", "text": "Hi!"},
])


def response(output: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1_700_000_000, "status": "completed",
            "model": "gpt-4.1-2025-04-14", "output": output, "error": None, "incomplete_details": None,
            "instructions": None, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 13, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
                      "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 22}}


def message_item(text: str, item_id: str = "msg_1") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


RESPONSE_TEXT = response([message_item("The quick brown fox.")])
RESPONSE_TOOLS = response([
    message_item("Checking the weather."),
    {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1", "name": "get_weather",
     "arguments": '{"city":"Paris"}'},
])


def gemini(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return {"candidates": candidates, "modelVersion": "gemini-2.5-flash", "responseId": "resp-g1",
            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 5, "totalTokenCount": 13}}


GEMINI_TEXT = gemini([{"content": {"role": "model", "parts": [{"text": "Hello from Gemini."}]},
                       "finishReason": "STOP", "index": 0}])
GEMINI_TOOLS = gemini([{"content": {"role": "model", "parts": [
    {"text": "Thinking it over.", "thought": True},
    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2ln"},
]}, "finishReason": "STOP", "index": 0}])

ROUND_TRIPS = [pytest.param(pair, whole, id=name) for name, pair, whole in [
    ("chat-text", CHAT, CHAT_TEXT), ("chat-n2", CHAT, CHAT_N2), ("chat-tools", CHAT, CHAT_TOOLS),
    ("chat-reasoning", CHAT, CHAT_REASONING), ("chat-refusal", CHAT, CHAT_REFUSAL),
    ("chat-logprobs", CHAT, CHAT_LOGPROBS), ("anthropic-text", ANTHROPIC, CLAUDE_TEXT),
    ("anthropic-tools", ANTHROPIC, CLAUDE_TOOLS), ("anthropic-thinking", ANTHROPIC, CLAUDE_THINKING),
    ("responses-text", RESPONSES, RESPONSE_TEXT), ("responses-function-call", RESPONSES, RESPONSE_TOOLS),
    ("gemini-text", GEMINI, GEMINI_TEXT), ("gemini-tools", GEMINI, GEMINI_TOOLS),
    ("gemini-stream-endpoint", GEMINI_STREAM, GEMINI_TEXT),
]]


def to_stream(pair: tuple[str, str], whole: dict[str, Any]) -> bytes:
    stream = stream_from_whole(*pair, orjson.dumps(whole))
    assert stream is not None
    return stream


def to_whole(pair: tuple[str, str], stream: bytes) -> Any:
    whole = whole_from_stream(*pair, stream)
    return None if whole is None else orjson.loads(whole)


@pytest.mark.parametrize(("pair", "whole"), ROUND_TRIPS)
def test_round_trip(pair, whole):
    stream = to_stream(pair, whole)
    assert to_whole(pair, stream) == whole
    assert to_stream(pair, to_whole(pair, stream)) == stream  # and back again, byte for byte


@pytest.mark.parametrize(("pair", "whole"), [p for p in ROUND_TRIPS if p.id in (
    "chat-n2", "anthropic-tools", "responses-function-call", "gemini-tools")])
def test_line_endings(pair, whole):
    stream = to_stream(pair, whole)
    for eol in (b"\r\n", b"\r"):
        assert to_whole(pair, stream.replace(b"\n", eol)) == whole
    # comments, and events without data (keep-alives), are no part of the answer
    assert to_whole(pair, b": keep-alive\n\nevent: ping\n\n" + stream) == whole


def test_chat_stream_shape():
    stream = to_stream(CHAT, CHAT_N2)
    assert stream.endswith(b"data: [DONE]\n\n")
    chunks = [orjson.loads(e[6:]) for e in stream.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-abc" and c["created"] == 1_700_000_000
               for c in chunks)
    assert chunks[-1] == {**{k: chunks[0][k] for k in ("id", "object", "created", "model", "system_fingerprint")},
                          "choices": [], "usage": CHAT_USAGE}
    assert [c["choices"][0]["index"] for c in chunks[:-1]] == [0, 0, 0, 1, 1, 1]
    # without usage in the body, no usage chunk
    bare = {k: v for k, v in CHAT_TEXT.items() if k != "usage"}
    assert b'"usage"' not in to_stream(CHAT, bare) and to_whole(CHAT, to_stream(CHAT, bare)) == bare


def test_responses_stream_shape():
    events = [orjson.loads(e.split(b"\ndata: ", 1)[1]) for e in to_stream(RESPONSES, RESPONSE_TOOLS).split(b"\n\n") if e]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert events[0]["response"] == {**RESPONSE_TOOLS, "status": "in_progress", "output": [], "usage": None}
    assert events[2]["item"] == {**RESPONSE_TOOLS["output"][0], "status": "in_progress", "content": []}
    assert events[-1]["response"] == RESPONSE_TOOLS


def chat_events(*chunks: dict[str, Any], done: bool = True) -> bytes:
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    out = b"".join(b"data: " + orjson.dumps({**base, **c}) + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def delta(index: int, finish: str | None = None, **d: Any) -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": d, "finish_reason": finish}]}


def test_chat_tool_calls_over_many_deltas_and_interleaved_choices():
    args = '{"city": "Paris"}'
    stream = chat_events(
        delta(0, role="assistant", content=None,
              tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": ""}}]),
        delta(1, role="assistant", content=""),
        delta(0, tool_calls=[{"index": 0, "function": {"name": "weather"}}]),
        *[delta(0, tool_calls=[{"index": 0, "function": {"arguments": c}}]) for c in args],
        delta(0, tool_calls=[{"index": 1, "id": "call_2", "type": "function", "function": {"name": "noop", "arguments": "{}"}}]),
        delta(1, content="Par"), delta(1, content="is"),
        delta(0, "tool_calls"), delta(1, "stop"),
        {"choices": [], "usage": CHAT_USAGE},
    )
    whole = to_whole(CHAT, stream)
    assert [c["message"] for c in whole["choices"]] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}},
            {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": "{}"}}]},
        {"role": "assistant", "content": "Paris"}]
    assert [c["finish_reason"] for c in whole["choices"]] == ["tool_calls", "stop"]
    assert whole["usage"] == CHAT_USAGE and whole["id"] == "chatcmpl-x" and whole["object"] == "chat.completion"
    # every choice needs its finish_reason; [DONE] alone does not complete an answer, nor is it required
    assert to_whole(CHAT, chat_events(delta(0, content="a"), delta(1, content="b"), delta(0, "stop"))) is None
    assert to_whole(CHAT, chat_events(delta(0, content="a"), delta(0, "stop"), done=False))["choices"][0]["message"] == {
        "role": "assistant", "content": "a"}


@pytest.mark.parametrize("stream", [
    b"", b"data: [DONE]\n\n", b'data: {"choices": ["x"]}\n\n', b'data: {"choices": [{"delta": 3}]}\n\n',
    b'data: {"error": {"message": "boom", "code": 500}}\n\ndata: [DONE]\n\n',
])
def test_chat_odd_streams_are_misses(stream):
    assert whole_from_stream(*CHAT, stream) is None


@pytest.mark.parametrize("pair", [CHAT, ANTHROPIC, RESPONSES, GEMINI])
@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b"null", b'{"choices": "x", "content": 3, "output": 7, "candidates": [1]}',
    b'{"error": {"message": "bad", "code": 400}}',
])
def test_odd_bodies_are_misses(pair, body):
    assert stream_from_whole(*pair, body) is None


@pytest.mark.parametrize(("pair", "whole"), [
    (CHAT, chat([{**chat_choice({"content": "cut"}), "finish_reason": None}])),
    (ANTHROPIC, {**CLAUDE_TEXT, "stop_reason": None}),
    (ANTHROPIC, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    (RESPONSES, {**RESPONSE_TEXT, "status": "incomplete"}),
    (GEMINI, gemini([{"content": {"role": "model", "parts": [{"text": "cut"}]}}])),
])
def test_incomplete_bodies_are_misses(pair, whole):
    assert stream_from_whole(*pair, orjson.dumps(whole)) is None


@pytest.mark.parametrize("pair", [("openai", "embeddings"), ("anthropic", "anthropic.count_tokens"),
                                  ("gemini", "gemini.countTokens"), ("gemini", "gemini.embedContent"),
                                  ("openai", "anthropic.messages"), ("anthropic", "chat")])
def test_unsupported_pairs(pair):
    assert stream_from_whole(*pair, orjson.dumps(CHAT_TEXT)) is None
    assert whole_from_stream(*pair, to_stream(CHAT, CHAT_TEXT)) is None


# -- the synthesized streams, read by the official SDKs -------------------------------------------


class ReplayServer(MockServer):
    """Answers every POST with `payload`, a few bytes at a time (events split anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.payload = b""

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{path:.*}", self.answer)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.record(request, await request.json(loads=orjson.loads))
        return await self.send_stream(request, [self.payload], piece=9)


@pytest.fixture(scope="module")
def replay() -> Iterator[ReplayServer]:
    yield from serving(ReplayServer())


def serve(server: ReplayServer, pair: tuple[str, str], whole: dict[str, Any]) -> None:
    server.reset()
    server.payload = to_stream(pair, whole)


HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("whole", [CHAT_TEXT, CHAT_N2, CHAT_TOOLS, CHAT_REASONING])
def test_openai_sdk_reads_chat_stream(replay, whole):
    serve(replay, CHAT, whole)
    client = openai.OpenAI(base_url=f"{replay.base_url}/v1", api_key="k", max_retries=0)
    texts: dict[int, str] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(model="m", messages=HI, stream=True, n=len(whole["choices"])):
        assert chunk.id == whole["id"] and chunk.model == whole["model"] and chunk.created == whole["created"]
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            add_tool_call_deltas(calls.setdefault(choice.index, {}), choice.delta.tool_calls)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert replay.last()["body"]["stream"] is True
    for choice in whole["choices"]:
        i, message = choice["index"], choice["message"]
        assert texts[i] == (message["content"] or "")
        assert finish[i] == choice["finish_reason"]
        assert [calls[i][k] for k in sorted(calls[i])] == [
            {"id": c["id"], **c["function"]} for c in message.get("tool_calls", [])]
    assert usage.model_dump(exclude_none=True) == CHAT_USAGE


@pytest.mark.parametrize("whole", [CHAT_TEXT, CHAT_TOOLS, CHAT_REFUSAL])
def test_openai_sdk_stream_helper_rebuilds_completion(replay, whole):
    serve(replay, CHAT, whole)
    client = openai.OpenAI(base_url=f"{replay.base_url}/v1", api_key="k", max_retries=0)
    with client.chat.completions.stream(model="m", messages=HI) as stream:
        final = stream.get_final_completion()
    got = final.model_dump(exclude_none=True)
    want = orjson.loads(orjson.dumps(whole))
    for choice in want["choices"]:
        choice.pop("logprobs")
        choice["message"] = {k: v for k, v in choice["message"].items() if v is not None}
    for choice in got["choices"]:
        choice["message"].pop("parsed", None)
        for call in choice["message"].get("tool_calls", ()):
            call["function"].pop("parsed_arguments", None)
            call.pop("index")  # the SDK keeps the delta's index
    assert got == want


@pytest.mark.parametrize("whole", [CLAUDE_TEXT, CLAUDE_TOOLS, CLAUDE_THINKING])
def test_anthropic_sdk_final_message(replay, whole):
    serve(replay, ANTHROPIC, whole)
    client = anthropic.Anthropic(base_url=replay.base_url, api_key="k", max_retries=0)
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(b.get("text", "") for b in whole["content"])
    got = final.to_dict()
    assert got.pop("stop_details", None) is None  # a field the SDK's message_delta handling always sets
    assert got == whole


@pytest.mark.parametrize("whole", [RESPONSE_TEXT, RESPONSE_TOOLS])
def test_openai_sdk_reads_responses_stream(replay, whole):
    serve(replay, RESPONSES, whole)
    client = openai.OpenAI(base_url=f"{replay.base_url}/v1", api_key="k", max_retries=0)
    events = list(client.responses.create(model="m", input="Hi", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.to_dict() == whole
    text = whole["output"][0]["content"][0]["text"]
    assert events[-1].response.output_text == text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    # the SDK's own accumulator follows every event (it raises on one that points at nothing)
    with client.responses.stream(model="m", input="Hi") as stream:
        assert [e.type for e in stream] == [e.type for e in events]
        final = stream.get_final_response()
    assert final.output_text == text and final.usage.output_tokens == 9


@pytest.mark.parametrize("whole", [GEMINI_TEXT, GEMINI_TOOLS])
def test_genai_sdk_reads_gemini_stream(replay, whole):
    serve(replay, GEMINI_STREAM, whole)
    options = types.HttpOptions(base_url=replay.base_url, retry_options=types.HttpRetryOptions(attempts=1))
    client = genai.Client(api_key="k", http_options=options)
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Hi"))
    assert replay.last()["path"].endswith("/models/gemini-2.5-flash:streamGenerateContent")
    assert len(chunks) == 1
    got = chunks[0].model_dump(mode="json", by_alias=True, exclude_none=True)
    got.pop("sdkHttpResponse", None)
    assert got == whole
    answer = [p for p in whole["candidates"][0]["content"]["parts"] if "text" in p and not p.get("thought")]
    assert (chunks[0].text or "") == "".join(p["text"] for p in answer)


# -- the mock providers' real streams -------------------------------------------------------------

anthropic_mock, _ = server_fixtures(MockAnthropic, "anthropic_mock", "fresh_anthropic_mock")
gemini_mock, _ = server_fixtures(MockGemini, "gemini_mock", "fresh_gemini_mock")


def fetch(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """The bytes a provider sent, up to where it dropped the connection, if it did."""
    received: list[bytes] = []
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as answer:
            assert answer.status_code == 200
            received.extend(answer.iter_raw())
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass
    return b"".join(received)


def openai_pair(url: str, body: dict[str, Any]) -> tuple[Any, bytes]:
    """(the whole answer, the stream) of the same request."""
    return orjson.loads(fetch(url, body)), fetch(url, {**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})


@pytest.mark.parametrize(("model", "n"), [("mock-x", 1), ("mock-x", 2), ("mock-tools", 1)])
def test_mock_openai_chat_streams(mock_upstream: MockUpstream, model, n):
    whole, stream = openai_pair(f"{mock_upstream.base_url}/chat/completions", {"model": model, "messages": HI, "n": n})
    for choice in whole["choices"]:
        choice["logprobs"] = None
    assert to_whole(CHAT, stream) == whole
    assert to_whole(CHAT, to_stream(CHAT, whole)) == whole


def test_mock_openai_chat_stream_variants(mock_upstream: MockUpstream):
    url = f"{mock_upstream.base_url}/chat/completions"
    no_usage = to_whole(CHAT, fetch(url, {"model": "mock-x", "messages": HI, "stream": True}))
    assert "usage" not in no_usage and no_usage["choices"][0]["message"]["content"] == "The quick brown fox jumps over the lazy dog."
    azure = fetch(f"{mock_upstream.root_url}/openai/deployments/mock-az/chat/completions?api-version=2024-10-21",
                  {"messages": HI, "stream": True})
    whole = to_whole(CHAT, azure)  # its first chunk has an empty id and model, and no choices
    assert whole["id"] == "chatcmpl-mock" and whole["model"] == "mock-az" and whole["choices"][0]["finish_reason"] == "stop"
    for model in ("mock-no-done", "mock-cut-3", "mock-stream-error-500", "mock-malformed"):
        stream = fetch(url, {"model": model, "messages": HI, "stream": True})
        assert stream.startswith(b"data: ")
        assert whole_from_stream(*CHAT, stream) is None, model


def test_mock_responses_streams(mock_upstream: MockUpstream):
    url = f"{mock_upstream.base_url}/responses"
    whole, stream = openai_pair(url, {"model": "mock-r", "input": "Hi"})
    assert to_whole(RESPONSES, stream) == whole
    assert to_whole(RESPONSES, to_stream(RESPONSES, whole)) == whole
    for model in ("mock-cut-3", "mock-stream-error-500", "mock-stream-late-error-500"):
        stream = fetch(url, {"model": model, "input": "Hi", "stream": True})
        assert b"response.created" in stream and whole_from_stream(*RESPONSES, stream) is None, model


CLAUDE_HEADERS = {"x-api-key": "k", "anthropic-version": "2023-06-01"}


@pytest.mark.parametrize("model", ["claude-test", "claude-cache", "claude-tools", "claude-thinking", "claude-split",
                                   "claude-stop-max_tokens"])
def test_mock_anthropic_streams(anthropic_mock: MockAnthropic, model):
    url, body = f"{anthropic_mock.base_url}/v1/messages", {"model": model, "max_tokens": 50, "messages": HI}
    whole = orjson.loads(fetch(url, body, CLAUDE_HEADERS))
    stream = fetch(url, {**body, "stream": True}, CLAUDE_HEADERS)
    assert to_whole(ANTHROPIC, stream) == whole
    assert to_whole(ANTHROPIC, to_stream(ANTHROPIC, whole)) == whole


@pytest.mark.parametrize("model", ["claude-stream-error", "claude-stream-error-first", "claude-cut",
                                   "claude-truncated"])
def test_mock_anthropic_broken_streams(anthropic_mock: MockAnthropic, model):
    body = {"model": model, "max_tokens": 50, "messages": HI, "stream": True}
    stream = fetch(f"{anthropic_mock.base_url}/v1/messages", body, CLAUDE_HEADERS)
    assert stream.startswith(b"event: ") and whole_from_stream(*ANTHROPIC, stream) is None


def gemini_fetch(server: MockGemini, model: str, stream: bool, n: int = 1) -> bytes:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}], "generationConfig": {"candidateCount": n}}
    if stream:
        return fetch(f"{server.base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse", body)
    return fetch(f"{server.base_url}/v1beta/models/{model}:generateContent", body)


@pytest.mark.parametrize(("model", "n"), [("gm-text", 1), ("gm-text", 2), ("gm-thinking", 1),
                                          ("gm-finish-MAX_TOKENS", 1), ("gm-finish-SAFETY", 1), ("gm-blocked", 1)])
def test_mock_gemini_streams(gemini_mock: MockGemini, model, n):
    whole = orjson.loads(gemini_fetch(gemini_mock, model, False, n))
    stream = gemini_fetch(gemini_mock, model, True, n)
    assert stream.endswith(b"\r\n\r\n")
    for pair in (GEMINI, GEMINI_STREAM):
        assert to_whole(pair, stream) == whole
        assert to_whole(pair, to_stream(pair, whole)) == whole


def test_mock_gemini_tool_stream(gemini_mock: MockGemini):
    whole = to_whole(GEMINI_STREAM, gemini_fetch(gemini_mock, "gm-tools", True))
    calls = orjson.loads(gemini_fetch(gemini_mock, "gm-tools", False))["candidates"][0]["content"]["parts"]
    assert whole["candidates"][0]["content"]["parts"] == [{"text": "Checking."}, *calls]  # non-text parts as they came
    assert whole["candidates"][0]["finishReason"] == "STOP" and whole["usageMetadata"]["candidatesTokenCount"] == 6


@pytest.mark.parametrize("model", ["gm-stream-error", "gm-stream-error-first", "gm-cut", "gm-no-finish"])
def test_mock_gemini_broken_streams(gemini_mock: MockGemini, model):
    stream = gemini_fetch(gemini_mock, model, True)
    assert stream.startswith(b"data: ") and whole_from_stream(*GEMINI_STREAM, stream) is None


def test_gemini_text_runs_join_across_chunks_only():
    def event(parts: list[dict[str, Any]], **extra: Any) -> bytes:
        candidate = {"content": {"role": "model", "parts": parts}, "index": 0, **extra}
        return b"data: " + orjson.dumps({"candidates": [candidate], "modelVersion": "g"}) + b"\r\n\r\n"

    stream = (event([{"text": "Hmm", "thought": True}]) + event([{"text": ", ok.", "thought": True}, {"text": "A"}])
              + event([{"text": "nswer", "thoughtSignature": "s"}]) + event([{"text": "!"}], finishReason="STOP"))
    parts = to_whole(GEMINI_STREAM, stream)["candidates"][0]["content"]["parts"]
    assert parts == [{"text": "Hmm, ok.", "thought": True}, {"text": "Answer", "thoughtSignature": "s"}, {"text": "!"}]
    kept = gemini([{"content": {"role": "model", "parts": [{"text": "a"}, {"text": "b"}]}, "finishReason": "STOP"}])
    assert to_whole(GEMINI, to_stream(GEMINI, kept)) == kept  # parts of one chunk stay as they are
