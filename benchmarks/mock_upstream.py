"""A very fast OpenAI-compatible mock upstream for benchmarks.

Raw asyncio ``Protocol`` on uvloop with a hand-rolled HTTP/1.1 parser, so that the mock is
never the bottleneck of a benchmark (it is meant to be pinned to its own core).

``POST /v1/chat/completions``
    * non-stream: a fixed, small ``chat.completion`` JSON with ``usage`` and ``Content-Length``;
    * ``"stream": true``: ``text/event-stream`` over chunked transfer-encoding with N content
      chunks, a final usage chunk ``{"choices":[],"usage":{...}}`` when
      ``stream_options.include_usage`` is true, then ``data: [DONE]``.

The gateway forwards only provider parameters, so the stream shape is read from the text of the
last user message: ``chunks=N`` (default 20) and ``delay_ms=D`` (default 0, the pause between
chunks). With no delay the whole stream is written at once.

``GET /v1/models`` and ``GET /health`` answer too. Keep-alive is the default (HTTP/1.1);
``Connection: close`` is honoured. Pipelined requests are answered in order.

Usage: ``python benchmarks/mock_upstream.py --port 9000``
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

DEFAULT_CHUNKS = 20
MAX_CHUNKS = 10_000
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
PROMPT_TOKENS = 9
COMPLETION_TEXT = "Hello! How can I help you today?"
COMPLETION_TOKENS = 9
CREATED = 1_700_000_000

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


# --------------------------------------------------------------------------- response bodies


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


@lru_cache(maxsize=256)
def stream_chunks(model: str, n: int, include_usage: bool) -> tuple[bytes, ...]:
    """The HTTP chunks of one stream (already chunk-framed), ending with the terminating chunk.

    Every SSE event is its own HTTP chunk: ``n`` content chunks (the last carries
    ``finish_reason: stop``), the usage chunk if asked for, ``[DONE]``, then ``0\\r\\n\\r\\n``.
    """
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
    return (*(_http_chunk(e) for e in events), b"0\r\n\r\n")


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


# --------------------------------------------------------------------------- request handling


def _last_user_text(messages: object) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # content parts
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
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


class MockProtocol(asyncio.Protocol):
    """One client connection: parses requests from the byte stream and answers them in order."""

    __slots__ = ("_buf", "_busy", "_closing", "_transport")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a delayed stream is being written; later requests wait
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

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
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._finish(_error(400, "body is not JSON", close), close)
            return
        if not isinstance(payload, dict):
            self._finish(_error(400, "body is not a JSON object", close), close)
            return
        model = payload.get("model")
        model = model if isinstance(model, str) else "mock-model"
        if payload.get("stream") is not True:
            self._finish(_json_response(200, completion_body(model), close), close)
            return
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        n, delay = stream_shape(payload)
        chunks = stream_chunks(model, n, include_usage)
        if delay <= 0:
            self._finish(_stream_head(close) + b"".join(chunks), close)
            return
        self._busy = True
        asyncio.get_running_loop().create_task(self._slow_stream(chunks, delay, close))

    async def _slow_stream(self, chunks: tuple[bytes, ...], delay: float, close: bool) -> None:
        """Write a stream with ``delay`` seconds between content chunks, then resume parsing."""
        try:
            transport = self._transport
            if transport is None:
                return
            transport.write(_stream_head(close) + chunks[0])
            for chunk in chunks[1:-1]:
                await asyncio.sleep(delay)
                if self._transport is None:
                    return
                self._transport.write(chunk)
            self._finish(chunks[-1], close)
        finally:
            self._busy = False
        if self._buf and self._transport is not None:
            self._process()


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
    parser = argparse.ArgumentParser(description="Fast OpenAI-compatible mock upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port (printed on stdout)")
    args = parser.parse_args(argv)

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
