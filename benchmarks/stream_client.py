"""A lean HTTP/1.1 load client for SSE streams (and plain JSON requests).

Raw asyncio ``Protocol`` on uvloop: one keep-alive connection per concurrent worker, each sending
the same POST in a closed loop until the deadline. Per request it records the time to the first
body bytes (TTFT: for an SSE response, the first event) and the total time to the end of the
response. It measures its own CPU time so that a run can show the client was not the bottleneck.

Prints one JSON object on stdout. Usage::

    python benchmarks/stream_client.py --url http://127.0.0.1:9000/v1/chat/completions \\
        --body '{"model": "gpt-4o-mini", "stream": true, "messages": [...]}' -c 16 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import orjson

_HEAD, _BODY_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER = range(5)


@dataclass(slots=True)
class Response:
    status: int
    start: float
    first_byte: float  # time the first body bytes arrived (0.0 if the body was empty)
    end: float
    body: bytes
    keep_alive: bool


class ConnectionClosed(Exception):
    """The server closed the connection before the response was complete."""


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends bytes and returns the parsed response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._state = _HEAD
        self._need = 0
        self._status = 0
        self._keep_alive = True
        self._start = 0.0
        self._first = 0.0
        self._body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionClosed(str(exc) if exc else "closed by peer"))

    def request(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._state = _HEAD
        self._body = bytearray()
        self._first = 0.0
        self._start = time.perf_counter()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            self._parse()
        except Exception as exc:  # a malformed response fails the request, not the client
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    def _got_body(self, chunk: bytes | bytearray) -> None:
        if not self._first and chunk:
            self._first = time.perf_counter()
        self._body += chunk

    def _parse(self) -> None:  # noqa: C901 - a small state machine reads best in one place
        buf = self._buf
        while True:
            if self._state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                parts = lines[0].split(" ", 2)
                self._status = int(parts[1])
                self._keep_alive = parts[0] != "HTTP/1.0"
                length = -1
                chunked = False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "transfer-encoding":
                        chunked = "chunked" in value.lower()
                    elif name == "connection":
                        self._keep_alive = value.strip().lower() != "close"
                if chunked:
                    self._state = _CHUNK_SIZE
                elif length >= 0:
                    self._state = _BODY_LENGTH
                    self._need = length
                else:
                    raise ValueError("response without Content-Length or chunked encoding")
            elif self._state == _BODY_LENGTH:
                if len(buf) < self._need:
                    return
                self._got_body(buf[: self._need])
                del buf[: self._need]
                self._done()
                return
            elif self._state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._state = _CHUNK_DATA
                    self._need = size
            elif self._state == _CHUNK_DATA:
                if len(buf) < self._need + 2:
                    return
                self._got_body(buf[: self._need])
                del buf[: self._need + 2]
                self._state = _CHUNK_SIZE
            else:  # _TRAILER: an empty line, or trailer fields then an empty line
                if buf[:2] == b"\r\n":
                    del buf[:2]
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    del buf[: end + 4]
                self._done()
                return

    def _done(self) -> None:
        self._state = _HEAD
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            response = Response(
                self._status,
                self._start,
                self._first,
                time.perf_counter(),
                bytes(self._body),
                self._keep_alive,
            )
            waiter.set_result(response)


# --------------------------------------------------------------------------- load loop


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    errors: int = 0
    error_sample: str = ""

    def error(self, message: str) -> None:
        self.errors += 1
        if not self.error_sample:
            self.error_sample = message[:500]


def build_request(url: str, body: bytes, headers: list[str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: */*",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _check(response: Response, stream: bool, results: Results) -> None:
    if response.status != 200:
        results.error(f"HTTP {response.status}: {response.body[:300]!r}")
        return
    if stream:
        if not response.body.rstrip().endswith(b"data: [DONE]"):
            results.error(f"stream did not end with [DONE]: {response.body[-300:]!r}")
            return
        results.events.append(response.body.count(b"data:"))
        results.ttfts.append(response.first_byte - response.start)
    results.latencies.append(response.end - response.start)


async def worker(
    host: str, port: int, request: bytes, stream: bool, deadline: float, max_requests: int, results: Results
) -> None:
    loop = asyncio.get_running_loop()
    proto: ClientProtocol | None = None
    while time.perf_counter() < deadline and len(results.latencies) + results.errors < max_requests:
        if proto is None or proto.closed:
            try:
                _, proto = await loop.create_connection(ClientProtocol, host, port)
            except OSError as exc:
                results.error(f"connect: {exc}")
                await asyncio.sleep(0.05)
                continue
        try:
            response = await proto.request(request)
        except (ConnectionClosed, ValueError) as exc:
            results.error(f"{type(exc).__name__}: {exc}")
            proto = None
            continue
        _check(response, stream, results)
        if not response.keep_alive and proto.transport is not None:
            proto.transport.close()
            proto = None
    if proto is not None and proto.transport is not None:
        proto.transport.close()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (need not be sorted); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return ordered[int(rank) - 1]


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    return {
        "p50": percentile(values, 50) * 1000,
        "p90": percentile(values, 90) * 1000,
        "p99": percentile(values, 99) * 1000,
        "max": max(values) * 1000,
        "mean": sum(values) / len(values) * 1000,
    }


async def run(
    url: str, body: bytes, headers: list[str], concurrency: int, duration: float, max_requests: int
) -> dict[str, object]:
    host, port, request = build_request(url, body, headers)
    stream = orjson.loads(body).get("stream") is True
    results = Results()
    cpu0 = sum(os.times()[:2])
    t0 = time.perf_counter()
    deadline = t0 + duration
    await asyncio.gather(
        *(worker(host, port, request, stream, deadline, max_requests, results) for _ in range(concurrency))
    )
    wall = time.perf_counter() - t0
    cpu = sum(os.times()[:2]) - cpu0
    done = len(results.latencies)
    out: dict[str, object] = {
        "requests": done,
        "errors": results.errors,
        "error_sample": results.error_sample,
        "wall_s": wall,
        "rps": done / wall if wall else 0.0,
        "latency_ms": summary_ms(results.latencies),
        "client_cpu_s": cpu,
        "client_cpu_util": cpu / wall if wall else 0.0,
    }
    if stream:
        out["ttft_ms"] = summary_ms(results.ttfts)
        events = results.events
        out["events_per_stream"] = {"min": min(events, default=0), "max": max(events, default=0)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Closed-loop HTTP/1.1 POST load client with TTFT")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON request body; 'stream': true selects SSE checks")
    parser.add_argument("-H", "--header", action="append", default=[], help="extra header, 'Name: value'")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("-n", "--max-requests", type=int, default=10**9)
    args = parser.parse_args(argv)
    coro = run(args.url, args.body.encode(), args.header, args.concurrency, args.duration, args.max_requests)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
