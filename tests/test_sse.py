"""The SSE tap: whatever the upstream's chunk boundaries, the same bytes go out and the same facts are read."""

from __future__ import annotations

import orjson

from proxy.sse import ChatStreamTap, error_event


def event(data: dict) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def chunk(delta: dict | None, finish: str | None = None, **extra) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return event({"id": "c", "object": "chat.completion.chunk", "model": "m-1", "choices": choices, **extra})


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
STREAM = (
    chunk({"role": "assistant", "content": ""})
    + chunk({"content": "Hel"})
    + b": a comment line\n\n"
    + chunk({"content": "lo"})
    + chunk({"tool_calls": [{"index": 0, "id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]})
    + chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]})
    + chunk({}, "stop")
    + chunk(None, usage=USAGE)
    + b"data: [DONE]\n\n"
)
USAGE_EVENT = chunk(None, usage=USAGE)


def run(pieces: list[bytes], hide: bool) -> tuple[bytes, ChatStreamTap]:
    tap = ChatStreamTap(hide_usage_chunk=hide)
    out = b"".join(tap.feed(p) for p in pieces) + tap.flush()
    return out, tap


def test_every_split_point_gives_the_same_result():
    whole, reference = run([STREAM], hide=False)
    assert whole == STREAM
    for cut in range(1, len(STREAM)):
        out, tap = run([STREAM[:cut], STREAM[cut:]], hide=False)
        assert out == STREAM, cut
        assert tap.usage == USAGE and tap.done and tap.finish_reasons == {0: "stop"}
        assert tap.messages() == reference.messages()


def test_byte_by_byte_with_the_usage_chunk_hidden():
    out, tap = run([STREAM[i:i + 1] for i in range(len(STREAM))], hide=True)
    assert out == STREAM.replace(USAGE_EVENT, b"")
    assert tap.usage == USAGE  # still accounted
    assert tap.messages() == [{"role": "assistant", "content": "Hello", "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]}]
    assert tap.content_deltas == 4 and tap.saw_content


def test_whole_chunks_pass_through_as_the_same_object():
    tap = ChatStreamTap(hide_usage_chunk=True)
    piece = chunk({"content": "x"})
    assert tap.feed(piece) is piece


def test_crlf_events_and_malformed_data_are_forwarded():
    tap = ChatStreamTap(hide_usage_chunk=False)
    out = tap.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\r\n\r\ndata: {not json}\n\n')
    assert out == b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: {not json}\n\n'
    assert tap.malformed == 1 and tap.messages()[0]["content"] == "a"


def test_an_error_inside_the_stream_is_seen():
    tap = ChatStreamTap(hide_usage_chunk=False)
    tap.feed(event({"error": {"message": "overloaded", "code": 529}}))
    assert tap.error == {"message": "overloaded", "code": 529}


def test_usage_on_a_chunk_with_choices_is_never_hidden():
    piece = chunk({"content": "x"}, usage=USAGE)
    tap = ChatStreamTap(hide_usage_chunk=True)
    assert tap.feed(piece) == piece and tap.usage == USAGE


def test_error_event_ends_with_done():
    data = error_event("boom", code=502)
    assert data.startswith(b'data: {"error":{"message":"boom"') and data.endswith(b"data: [DONE]\n\n")


def test_sse_decoder_whatever_the_boundaries():
    from proxy.sse import SSEDecoder

    stream = (b"event: message_start\ndata: {\"a\":1}\n\n: ping\n\nevent: ping\ndata: {}\r\n\r\n"
              b"data: line1\ndata: line2\n\nevent: message_stop\ndata: {\"z\":2}\n\n")
    expected = [("message_start", b'{"a":1}'), ("ping", b"{}"), (None, b"line1\nline2"), ("message_stop", b'{"z":2}')]
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.flush()
        assert events == expected, cut
    decoder = SSEDecoder()
    assert decoder.feed(b"data: unterminated") == [] and decoder.flush() == [(None, b"unterminated")]


def test_reasoning_deltas_are_kept_for_the_log():
    tap = ChatStreamTap(hide_usage_chunk=False)
    tap.feed(chunk({"reasoning_content": "Let me think."}) + chunk({"content": "42"}) + chunk({}, "stop"))
    assert tap.messages() == [{"role": "assistant", "content": "42", "reasoning_content": "Let me think."}]
