"""Hypothesis fuzzing of what reads untrusted bytes (issue 10, bad input):

- the SSE scanner and taps (proxy/sse.py, sse_anthropic.py, sse_gemini.py, sse_responses.py): any bytes,
  split anywhere, never raise (no error is documented for them: a provider's odd stream is forwarded
  and accounted as well as it can be), and a stream split at any points reads the same events, usage,
  content and output as the stream fed whole;
- the gateway param parsers (proxy/params.py): any JSON value for any param, on any channel, is
  parsed or a ParamsError naming the field, never another exception;
- the body reader (proxy/endpoints/body.py): any bytes, in any chunks, are a dict or a GatewayError.

Deterministic (derandomize) so CI is repeatable."""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.endpoints.body import MAX_JSON_DEPTH, nests_deeper, parse_object, read_body
from proxy.errors import GatewayError
from proxy.params import GATEWAY_KEYS, ParamsError, split_params
from proxy.sse import ChatStreamTap, SSEDecoder
from proxy.sse_anthropic import AnthropicStreamTap
from proxy.sse_gemini import GeminiStreamTap
from proxy.sse_responses import ResponsesStreamTap

FUZZ = settings(max_examples=int(os.environ.get("LLMRELAY_FUZZ_EXAMPLES", "150")), derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


# -- taps: the shapes each one reads, with any JSON in their fields ------------------------------------------

def keys_from(*names: str) -> st.SearchStrategy[dict[str, Any]]:
    """Objects made of the keys a tap looks at (with values of any JSON type), plus others."""
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=5), json_values | st.just({}), max_size=5)


chat_event = st.one_of(
    keys_from("model", "choices", "usage", "error", "id"),
    st.fixed_dictionaries({"choices": st.lists(keys_from("index", "delta", "finish_reason"), max_size=3)}),
    st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries(
        {"index": st.integers(0, 3), "delta": keys_from("content", "tool_calls", "reasoning_content", "role")}),
        max_size=2)}),
    st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({"index": st.integers(0, 2), "delta": st.fixed_dictionaries(
        {"tool_calls": st.lists(keys_from("index", "id", "function", "type"), max_size=2)})}), max_size=2)}),
    st.fixed_dictionaries({"usage": keys_from("prompt_tokens", "completion_tokens", "total_tokens")}),
)
anthropic_event = st.one_of(
    keys_from("type", "index", "delta", "content_block", "message", "usage", "error"),
    st.fixed_dictionaries({"type": st.sampled_from(["content_block_start", "content_block_delta", "message_start",
                                                    "message_delta", "message_stop", "error"]),
                           "index": json_values, "delta": keys_from("type", "text", "partial_json", "thinking", "stop_reason"),
                           "content_block": keys_from("type", "text", "id", "name", "input"),
                           "message": keys_from("model", "usage", "id"), "usage": keys_from("input_tokens", "output_tokens")}),
)
gemini_event = st.one_of(
    keys_from("candidates", "usageMetadata", "modelVersion", "promptFeedback", "error"),
    st.fixed_dictionaries({"candidates": st.lists(keys_from("content", "finishReason", "index") | st.fixed_dictionaries(
        {"index": json_values, "content": keys_from("parts", "role") | st.fixed_dictionaries(
            {"parts": st.lists(keys_from("text", "thought", "functionCall", "inlineData"), max_size=3)})}), max_size=3),
        "usageMetadata": keys_from("promptTokenCount", "candidatesTokenCount", "totalTokenCount")}),
)
responses_event = st.one_of(
    keys_from("type", "response", "item", "delta", "output_index", "sequence_number", "error"),
    st.fixed_dictionaries({"type": st.sampled_from(["response.created", "response.output_text.delta", "response.completed",
                                                    "response.failed", "response.incomplete", "error",
                                                    "response.output_item.done"]),
                           "response": keys_from("model", "usage", "output", "status", "error"),
                           "item": keys_from("type", "content", "role"), "delta": json_values}),
)

TAPS = {
    "chat": (lambda: ChatStreamTap(hide_usage_chunk=True), chat_event),
    "chat-usage-shown": (lambda: ChatStreamTap(hide_usage_chunk=False), chat_event),
    "anthropic": (AnthropicStreamTap, anthropic_event),
    "gemini": (GeminiStreamTap, gemini_event),
    "responses": (ResponsesStreamTap, responses_event),
}


def frame(events: list[Any], names: list[str | None], crlf: bool, done: bool) -> bytes:
    out = []
    for event, name in zip(events, names, strict=False):
        head = f"event: {name}\n".encode() if name else b""
        out.append(head + b"data: " + orjson.dumps(event) + b"\n\n")
    if done:
        out.append(b"data: [DONE]\n\n")
    data = b"".join(out)
    return data.replace(b"\n", b"\r\n") if crlf else data


def run(tap: Any, chunks: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    out = b"".join(tap.feed(c) for c in chunks) + tap.flush()
    state = {k: getattr(tap, k) for k in ("model", "done", "saw_content", "error", "events", "content_deltas", "usage",
                                           "finish_reasons", "malformed", "stop_reason") if hasattr(tap, k)}
    state["messages"] = tap.messages()
    if hasattr(tap, "final_usage"):
        state["final_usage"] = tap.final_usage()
    tap.error_status()
    return out, state


def decoded(out: bytes) -> list[tuple[str | None, bytes]]:
    decoder = SSEDecoder()
    return decoder.feed(out) + decoder.flush()


@pytest.mark.parametrize("kind", TAPS)
@FUZZ
@given(data=st.data(), cuts=st.lists(st.integers(0, 10_000), max_size=8), crlf=st.booleans(), done=st.booleans())
def test_valid_stream_split_anywhere_reads_the_same(kind: str, data: Any, cuts: list[int], crlf: bool, done: bool) -> None:
    factory, events = TAPS[kind]
    sent = data.draw(st.lists(events, max_size=6))
    names = data.draw(st.lists(st.none() | st.sampled_from(["message_start", "ping", "x"]), min_size=len(sent),
                               max_size=len(sent)))
    stream = frame(sent, names, crlf, done)
    whole_out, whole = run(factory(), [stream])
    split_out, split = run(factory(), pieces(stream, cuts))
    assert split == whole
    assert decoded(split_out) == decoded(whole_out)
    if kind.startswith("chat"):
        assert whole["events"] == len(sent) + done


@pytest.mark.parametrize("kind", TAPS)
@FUZZ
@given(raw=st.binary(max_size=400) | st.lists(st.sampled_from(
    [b"data: ", b"data:", b"event: x", b"\n", b"\r\n", b"\r", b"{", b"}", b"[DONE]", b'{"choices":[{"delta":{}}]}',
     b'{"type":"content_block_delta","index":[]}', b'{"candidates":[{"index":{}}]}', b"\xff", b": comment"]),
    max_size=40).map(b"".join), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_any_bytes_split_anywhere_never_raise(kind: str, raw: bytes, cuts: list[int]) -> None:
    factory, _ = TAPS[kind]
    run(factory(), pieces(raw, cuts))
    decoder = SSEDecoder()
    for c in pieces(raw, cuts):
        decoder.feed(c)
    decoder.flush()


# -- gateway params --------------------------------------------------------------------------------------------

@FUZZ
@given(key=st.sampled_from(sorted(GATEWAY_KEYS)), value=json_values,
       channel=st.sampled_from(["top", "respan_params", "keywordsai_params", "header", "header-base64"]))
def test_any_value_for_any_param_is_parsed_or_names_the_field(key: str, value: Any, channel: str) -> None:
    body: dict[str, Any] = {"model": "m"}
    header = None
    if channel == "top":
        body[key] = value
    elif channel.startswith("header"):
        header = orjson.dumps({key: value}).decode()
        if channel == "header-base64":
            header = base64.b64encode(header.encode()).decode()
    else:
        body[channel] = {key: value}
    try:
        split_params(body, header)
    except ParamsError as exc:
        assert exc.field.split(".")[0].split("[")[0] in (key, "respan_params"), (exc.field, key)
        assert exc.message
    assert body == {"model": "m"}  # every gateway param is split off


@FUZZ
@given(container=json_values, header=st.text(max_size=60) | json_values.map(lambda v: orjson.dumps(v).decode()),
       customer=st.none() | st.text(max_size=10))
def test_any_container_or_header_is_parsed_or_names_the_channel(container: Any, header: str, customer: str | None) -> None:
    try:
        split_params({"respan_params": container}, header, customer)
    except ParamsError as exc:
        assert exc.field in ("respan_params", "X-Data-Respan-Params") or exc.field.split(".")[0] in GATEWAY_KEYS, exc.field


# -- body reader -----------------------------------------------------------------------------------------------

@FUZZ
@given(raw=st.binary(max_size=300) | json_values.map(orjson.dumps), cuts=st.lists(st.integers(0, 400), max_size=5),
       declared=st.none() | st.text("0123456789 -abc", max_size=6), limit=st.integers(0, 400))
def test_body_reader_any_bytes_any_chunks(raw: bytes, cuts: list[int], declared: str | None, limit: int) -> None:
    messages = [{"type": "http.request", "body": p, "more_body": True} for p in pieces(raw, cuts)]
    messages[-1]["more_body"] = False

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    headers = {} if declared is None else {"content-length": declared}
    try:
        body = asyncio.run(read_body(headers, receive, limit))
    except GatewayError as exc:
        assert exc.status in (400, 413) and exc.detail
        return
    assert body == raw and len(body) <= limit
    try:
        assert isinstance(parse_object(body), dict)
    except GatewayError as exc:
        assert exc.status in (400, 422) and exc.detail


# -- regressions the fuzzing found -------------------------------------------------------------------------

def test_anthropic_block_index_or_text_of_another_type() -> None:
    """`"index": []` raised TypeError (unhashable) out of the relay; a non-string text, TypeError on `+`."""
    tap = AnthropicStreamTap()
    stream = frame([{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": 5}},
                    {"type": "content_block_delta", "index": [], "delta": {"type": "text_delta", "text": "a"}},
                    {"type": "content_block_start", "index": {}, "content_block": {"type": "text", "text": ""}},
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "b"}},
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ["c"]}}],
                   [None] * 5, crlf=False, done=False)
    out, state = run(tap, [stream])
    assert out == stream and state["content_deltas"] == 3  # forwarded unchanged
    assert state["messages"][0]["content"] == "b"


def test_responses_event_type_of_another_type() -> None:
    """`"type": [null]` raised TypeError (unhashable, `kind in TERMINAL`)."""
    _, state = run(ResponsesStreamTap(), [b'data: {"type": [null]}\n\nevent: response.output_text.delta\ndata: {"type": 1, "delta": "hi"}\n\n'])
    assert state["events"] == 2 and state["messages"] == [{"role": "assistant", "content": "hi"}]


def test_atheris_harness() -> None:
    """The coverage-guided harness (tests/fuzzers/atheris_taps.py), bounded and seeded: no input raises."""
    # the test extras install atheris where it has a wheel (CPython 3.11 on x86_64, as here and in CI)
    if not (sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64"):
        pytest.skip("atheris has no wheel for this Python or CPU; the hypothesis tests above still fuzz the taps")
    import atheris  # noqa: F401  (installed by the test extras: a missing one fails here)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "tests/fuzzers/atheris_taps.py"), "-runs=30000", "-seed=1"],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]


@FUZZ
@given(value=json_values, depth=st.integers(0, 300))
def test_nests_deeper_is_exact(value: Any, depth: int) -> None:
    """nests_deeper (orjson's limit, shifted) agrees with a plain walk, at every depth around the limit."""
    def walk(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + max(map(walk, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(walk, v), default=0)
        return 0

    for _ in range(depth):
        value = [value]
    assert nests_deeper(value, MAX_JSON_DEPTH) == (walk(value) > MAX_JSON_DEPTH)
