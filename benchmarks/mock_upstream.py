"""A very fast OpenAI- and Anthropic-compatible mock upstream for benchmarks.

Raw asyncio ``Protocol`` on uvloop with a hand-rolled HTTP/1.1 parser, so that the mock is
never the bottleneck of a benchmark (it is meant to be pinned to its own core).

``POST /v1/chat/completions`` (OpenAI)
    * non-stream: a fixed, small ``chat.completion`` JSON with ``usage`` and ``Content-Length``;
    * ``"stream": true``: ``text/event-stream`` over chunked transfer-encoding with N content
      chunks, a final usage chunk ``{"choices":[],"usage":{...}}`` when
      ``stream_options.include_usage`` is true, then ``data: [DONE]``: N + 1 events, N + 2 with
      usage.

``POST /v1/messages`` (Anthropic Messages API; any path ending in ``/messages``; the gateway's
``anthropic`` provider reaches it with ``base_url: http://HOST:PORT``, ``/v1`` optional)
    * non-stream: a fixed ``message`` object (``id``, ``type: "message"``, ``role``, ``model``
      echoing the request's, one text block, ``stop_reason: "end_turn"``, ``usage`` with
      ``input_tokens`` / ``output_tokens``);
    * ``"stream": true``: Anthropic's SSE sequence, each event an ``event: <type>`` line and a
      ``data:`` line: ``message_start`` (usage.input_tokens), ``content_block_start``, N
      ``content_block_delta`` (``text_delta``), ``content_block_stop``, ``message_delta``
      (stop_reason ``end_turn``, usage.output_tokens = N), ``message_stop``: N + 5 events, no
      ``[DONE]``. No ``ping`` events.
    * ``POST /v1/messages/count_tokens`` answers ``{"input_tokens": 9}``; errors use Anthropic's
      ``{"type":"error","error":{...}}`` shape. No header is checked (``x-api-key`` may be anything).

Stream shape, both protocols: the gateway forwards only provider parameters, so it is read from
the text of the last user message (a string, or the ``text`` of its content parts / blocks):
``chunks=N`` (default 20, at most 10,000) and ``delay_ms=D`` (default 0).

* ``delay_ms=0``: the whole stream (head included) goes out in one write.
* ``delay_ms=D`` > 0 (pacing, like a model emitting tokens): every SSE event is its own write
  (its own HTTP chunk; the last event carries the terminating ``0`` chunk), so a client sees
  real per-event arrival times. OpenAI: the first content chunk goes out with the response head,
  then D ms before each further event (content, usage, ``[DONE]``). Anthropic: ``message_start``,
  ``content_block_start`` and the first delta go out at once (one write each), then D ms before
  each further delta, D ms before ``content_block_stop``, and ``message_delta`` and
  ``message_stop`` right after it, as the real API ends a message. Due times are fixed from the
  stream's start (event i at the sum of the pauses before it), like a model emitting tokens at
  its own pace: a late write does not push back the ones after it, so a stream lasts about
  N x D. Timers have the event loop's 1 ms resolution (uvloop).

``GET /v1/models`` and ``GET /health`` answer too. Keep-alive is the default (HTTP/1.1);
``Connection: close`` is honoured. Pipelined requests are answered in order (a request that
arrives during a paced stream waits for its end). At start the open-files soft limit is raised
to the hard limit, so thousands of concurrent connections work.

Usage: ``python benchmarks/mock_upstream.py --port 9000`` (``--port 0`` picks a free port; the
port is printed on stdout: ``mock upstream listening on http://HOST:PORT pid=PID``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
from collections.abc import Callable
from functools import lru_cache
from typing import cast

import orjson
from procstat import raise_open_files_limit

DEFAULT_CHUNKS = 20
MAX_CHUNKS = 10_000
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
PROMPT_TOKENS = 9
COMPLETION_TEXT = "Hello! How can I help you today?"
COMPLETION_TOKENS = 9
CREATED = 1_700_000_000
TERMINATOR = b"0\r\n\r\n"  # the last chunk of a chunked body

_CHUNKS_RE = re.compile(r"chunks=(\d+)")
_DELAY_RE = re.compile(r"delay_ms=(\d+(?:\.\d+)?)")

_STATUS_TEXT = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    411: b"Length Required",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
}

# A stream as the protocol writes it: the writes (already chunk-framed, the last one ending with
# the terminating chunk), the pause in seconds before each (the first is always 0), and all the
# writes joined (what an unpaced stream sends in one go).
Plan = tuple[tuple[bytes, ...], tuple[float, ...], bytes]


# --------------------------------------------------------------------------- OpenAI bodies


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


@lru_cache(maxsize=64)
def completion_body(model: str) -> bytes:
    """The fixed non-stream ``chat.completion`` body for ``model``."""
    return orjson.dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": COMPLETION_TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(COMPLETION_TOKENS),
        }
    )


def _chunk_event(model: str, delta: dict[str, str], finish: str | None) -> bytes:
    chunk = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _http_chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 transfer-encoding chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def openai_events(model: str, n: int, include_usage: bool) -> list[bytes]:
    """The SSE events of one chat stream: ``n`` content chunks (the last carries
    ``finish_reason: stop``), the usage chunk if asked for, then ``[DONE]``."""
    events: list[bytes] = []
    for i in range(n):
        delta = {"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}
        events.append(_chunk_event(model, delta, "stop" if i == n - 1 else None))
    if include_usage:
        usage_chunk = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [],
            "usage": _usage(n),
        }
        events.append(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


# --------------------------------------------------------------------------- Anthropic bodies


@lru_cache(maxsize=64)
def message_body(model: str) -> bytes:
    """The fixed non-stream Messages API ``message`` body for ``model``."""
    return orjson.dumps(
        {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": COMPLETION_TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS},
        }
    )


def _named_event(data: dict[str, object]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (cast(str, data["type"]).encode(), orjson.dumps(data))


def anthropic_events(model: str, n: int) -> list[bytes]:
    """The SSE events of one Messages stream, as Anthropic sends them (without ``ping``)."""
    start = {
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1},
    }
    delta = _named_event(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tok "}}
    )
    return [
        _named_event({"type": "message_start", "message": start}),
        _named_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        *([delta] * n),
        _named_event({"type": "content_block_stop", "index": 0}),
        _named_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": n},
            }
        ),
        _named_event({"type": "message_stop"}),
    ]


# --------------------------------------------------------------------------- stream plans


def _plan(events: list[bytes], delays: list[float]) -> Plan:
    writes = [_http_chunk(e) for e in events]
    writes[-1] += TERMINATOR
    return tuple(writes), tuple(delays), b"".join(writes)


def _wants_usage(payload: dict) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@lru_cache(maxsize=256)
def openai_plan(model: str, n: int, include_usage: bool, delay: float) -> Plan:
    """A chat stream: the first event at once, then ``delay`` before each further one."""
    events = openai_events(model, n, include_usage)
    return _plan(events, [0.0] + [delay] * (len(events) - 1))


@lru_cache(maxsize=256)
def anthropic_plan(model: str, n: int, delay: float) -> Plan:
    """A Messages stream: message_start, content_block_start and the first delta at once, then
    ``delay`` before each further delta and before content_block_stop; message_delta and
    message_stop follow content_block_stop at once."""
    events = anthropic_events(model, n)
    delays = [0.0, 0.0, 0.0] + [delay] * (n - 1) + [delay, 0.0, 0.0]
    return _plan(events, delays)


def _response_head(status: int, content_type: bytes, length: int | None, close: bool) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s" % (status, _STATUS_TEXT.get(status, b"Unknown")),
        b"Content-Type: " + content_type,
    ]
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"Cache-Control: no-cache")
    else:
        lines.append(b"Content-Length: %d" % length)
    lines.append(b"Connection: close" if close else b"Connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n"


@lru_cache(maxsize=16)
def _stream_head(close: bool) -> bytes:
    return _response_head(200, b"text/event-stream", None, close)


def _json_response(status: int, body: bytes, close: bool) -> bytes:
    return _response_head(status, b"application/json", len(body), close) + body


def _error(status: int, message: str, close: bool) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "mock_error", "code": status}})
    return _json_response(status, body, close)


_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}


def _anthropic_error(status: int, message: str, close: bool) -> bytes:
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
    return _json_response(status, body, close)


# --------------------------------------------------------------------------- request handling


def _last_user_text(messages: object) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # OpenAI content parts or Anthropic content blocks
                return " ".join(
                    p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
    return ""


def stream_shape(payload: dict[str, object]) -> tuple[int, float]:
    """``(chunks, delay_seconds)`` requested by the last user message's text."""
    text = _last_user_text(payload.get("messages"))
    n = DEFAULT_CHUNKS
    delay = 0.0
    if "=" in text:
        if m := _CHUNKS_RE.search(text):
            n = max(1, min(MAX_CHUNKS, int(m.group(1))))
        if m := _DELAY_RE.search(text):
            delay = float(m.group(1)) / 1000.0
    return n, delay


def _json_object(body: bytes) -> dict[str, object] | str:
    """The request body as a dict, or the reason it is not one."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "body is not JSON"
    return payload if isinstance(payload, dict) else "body is not a JSON object"


def _model(payload: dict[str, object]) -> str:
    model = payload.get("model")
    return model if isinstance(model, str) else "mock-model"


class MockProtocol(asyncio.Protocol):
    """One client connection: parses requests from the byte stream and answers them in order."""

    __slots__ = (
        "_buf", "_busy", "_closing", "_transport", "_writes", "_delays", "_step", "_due", "_close_after", "_timer",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a paced stream is being written; later requests wait
        self._closing = False
        self._writes: tuple[bytes, ...] = ()
        self._delays: tuple[float, ...] = ()
        self._step = 0
        self._due = 0.0  # loop time the next write of a paced stream is due
        self._close_after = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()

    # The parser: loops over complete requests in the buffer.
    def _process(self) -> None:
        buf = self._buf
        while buf and not self._busy and not self._closing and self._transport is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._finish(_error(431, "headers too large", True), close=True)
                return
            head = bytes(buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self._finish(_error(400, "bad request line", True), close=True)
                return
            length = 0
            close = version == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection":
                    v = value.strip().lower()
                    close = v == "close" or (close and v != "keep-alive")
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    self._finish(_error(411, "chunked request bodies are not supported", True), close=True)
                    return
            if length > MAX_BODY_BYTES:
                self._finish(_error(413, "body too large", True), close=True)
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self._handle(method, target, body, close)

    def _finish(self, data: bytes, close: bool) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(data)
        if close:
            self._closing = True
            transport.close()

    def _handle(self, method: str, target: str, body: bytes, close: bool) -> None:
        path = target.split("?", 1)[0]
        if path.endswith("/chat/completions"):
            if method != "POST":
                self._finish(_error(405, "use POST", close), close)
                return
            self._chat(body, close)
        elif path.endswith("/messages"):
            if method != "POST":
                self._finish(_anthropic_error(405, "use POST", close), close)
                return
            self._messages(body, close)
        elif path.endswith("/messages/count_tokens") and method == "POST":
            self._finish(_json_response(200, b'{"input_tokens":%d}' % PROMPT_TOKENS, close), close)
        elif path in ("/health", "/v1/health") and method == "GET":
            self._finish(_json_response(200, b'{"status":"ok"}', close), close)
        elif path.endswith("/models") and method == "GET":
            models = b'{"object":"list","data":[{"id":"gpt-4o-mini","object":"model","owned_by":"mock"}]}'
            self._finish(_json_response(200, models, close), close)
        elif path == "/v1/traces" and method == "POST":  # OTLP/HTTP spans of the otel pipeline: accepted, dropped
            self._finish(_json_response(200, b"{}", close), close)
        else:
            self._finish(_error(404, f"no route for {method} {path}", close), close)

    def _chat(self, body: bytes, close: bool) -> None:
        self._answer(body, close, _error, completion_body, lambda payload, model, n, delay: openai_plan(
            model, n, _wants_usage(payload), delay))

    def _messages(self, body: bytes, close: bool) -> None:
        self._answer(body, close, _anthropic_error, message_body,
                     lambda payload, model, n, delay: anthropic_plan(model, n, delay))

    def _answer(self, body: bytes, close: bool, error: Callable[[int, str, bool], bytes],
                whole: Callable[[str], bytes], plan: Callable[[dict, str, int, float], Plan]) -> None:
        """One API's answer: its error shape for a bad body, its whole answer, or its stream."""
        payload = _json_object(body)
        if isinstance(payload, str):
            self._finish(error(400, payload, close), close)
            return
        model = _model(payload)
        if payload.get("stream") is not True:
            self._finish(_json_response(200, whole(model), close), close)
            return
        n, delay = stream_shape(payload)
        self._stream(plan(payload, model, n, delay), delay, close)

    def _stream(self, plan: Plan, delay: float, close: bool) -> None:
        if delay <= 0:
            self._finish(_stream_head(close) + plan[2], close)
            return
        if self._transport is None:
            return
        self._busy = True
        self._writes, self._delays, _ = plan
        self._close_after = close
        self._transport.write(_stream_head(close) + self._writes[0])
        self._step = 1
        self._due = asyncio.get_running_loop().time()
        self._advance()

    def _advance(self) -> None:
        """Write the writes of a paced stream that are due now, then set a timer for the next one.

        Due times are fixed from the stream's start, like a model emitting tokens at its own pace:
        a late write does not delay the ones after it. A timer callback per write rather than a
        task that sleeps: no coroutine or future each."""
        transport = self._transport
        if transport is None:
            self._busy = False
            return
        writes, delays, i = self._writes, self._delays, self._step
        while i < len(writes) and delays[i] <= 0:
            transport.write(writes[i])
            i += 1
        self._step = i
        if i < len(writes):
            self._due += delays[i]
            self._timer = asyncio.get_running_loop().call_at(self._due, self._tick)
            return
        self._writes = self._delays = ()
        self._busy = False
        if self._close_after:
            self._closing = True
            transport.close()
        elif self._buf:
            self._process()

    def _tick(self) -> None:
        self._timer = None
        if self._transport is None:
            self._busy = False
            return
        self._transport.write(self._writes[self._step])
        self._step += 1
        self._advance()


# --------------------------------------------------------------------------- entry point


async def serve(host: str, port: int, ready: Callable[[int], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fast OpenAI- and Anthropic-compatible mock upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port (printed on stdout)")
    args = parser.parse_args(argv)
    raise_open_files_limit()

    def ready(port: int) -> None:
        print(f"mock upstream listening on http://{args.host}:{port} pid={os.getpid()}", flush=True)

    try:
        import uvloop
    except ImportError:  # still works, only slower
        asyncio.run(serve(args.host, args.port, ready))
    else:
        uvloop.run(serve(args.host, args.port, ready))


if __name__ == "__main__":
    main()
