"""A lean HTTP/1.1 load client for SSE streams (and plain JSON requests).

Raw asyncio ``Protocol`` on uvloop, one request in flight per connection. It measures its own
CPU time so that a run can show the client was not the bottleneck, and raises its open-files soft
limit to the hard limit at start (thousands of sockets). Two modes; both print one JSON object on
stdout.

**Closed loop** (default): ``-c`` keep-alive connections, each sending the same POST again and
again until ``-d`` seconds (or ``-n`` requests) are up::

    python benchmarks/stream_client.py --url http://127.0.0.1:9000/v1/chat/completions \\
        --body '{"model": "gpt-4o-mini", "stream": true, "messages": [...]}' -c 16 -d 5

**Hold** (``--hold N``): N connections at once, one stream on each, started as fast as possible
(or spread evenly over ``--ramp S`` seconds); each connection closes after its stream. With a
paced mock stream (``chunks=200 delay_ms=20`` in the user message: about 4 s per stream) all N are
open at the same time, which is what ``peak_open`` shows. A stream that takes longer than
``--timeout`` seconds (default 60) is an error::

    python benchmarks/stream_client.py --url http://127.0.0.1:9000/v1/chat/completions \\
        --body '{"model": "m", "stream": true, "messages": [{"role": "user", "content": "chunks=200 delay_ms=20"}]}' \\
        --hold 1000 --expect-events 201

``--unique MARK``: every request replaces the first ``MARK`` in the body with a 10-digit counter
(fixed width, so one Content-Length; the request bytes are pre-split, one bytes format per request),
so no two bodies of a run are the same: behind a response cache each is a miss. Put a per-run seed
next to the mark to keep bodies distinct across runs.

A request is a stream when its body has ``"stream": true``. A stream is correct when the status
is 200, its body ends with the end marker (``--end-marker``; by default ``data: [DONE]``, or
``"type":"message_stop"}`` when the URL path ends with ``/messages``, Anthropic's last event)
and, with ``--expect-events K``, it had exactly K SSE events. SSE events are counted on the
blank line that ends each (``\\n\\n``), as they arrive, whatever the TCP reads: an event may span
reads, a read may hold many.

JSON fields (times in ms; each ``*_ms`` is ``{p50, p90, p99, max, mean}``):

* ``requests`` (correct responses), ``errors``, ``error_sample`` (the first error),
  ``error_samples`` (up to 5 distinct), ``wall_s``, ``rps``, ``latency_ms`` (request sent to the
  end of the response), ``client_cpu_s``, ``client_cpu_util`` (share of one core),
  ``client_max_rss_mb``, ``open_files_limit``;
* streams: ``ttft_ms`` (request sent to the first body bytes, i.e. the first event),
  ``events_per_stream`` ``{min, max}`` (SSE events), ``chunk_gap_ms``: the gaps between
  consecutive events of a stream, over all correct streams, by arrival time (the time of the
  read that completed the event; events completed by one read have a gap of 0). ``chunk_gap_ms``
  has ``{p50, p90, p99, max, mean, count}``. Against a paced mock (``delay_ms=D``) the direct
  gaps are about D; through a proxy, what it adds per chunk shows as gaps above that (jitter, or
  a proxy falling behind the pace); a delay equal for every event shows in TTFT, not in gaps;
  ``inner_gap_ms``: the same without each stream's last gap (the wait for the end marker: a
  gateway that asks upstream for a usage chunk and hides it from the client makes that gap twice
  the pace, which with 20 chunks alone sets the p99);
* hold mode adds ``mode: "hold"``, ``streams`` (N), ``peak_open`` (the most streams started
  and not yet finished at one time), ``ramp_s`` (first request sent to the last one sent) and
  ``connect_ms`` (TCP connect times).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import orjson
from procstat import raise_open_files_limit

_HEAD, _BODY_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER = range(5)
DONE_MARKER = b"data: [DONE]"
ANTHROPIC_END_MARKER = b'"type":"message_stop"}'
MAX_ERROR_SAMPLES = 5
_clock = time.perf_counter


@dataclass(slots=True)
class Response:
    status: int
    start: float
    first_byte: float  # time the first body bytes arrived (0.0 if the body was empty)
    end: float
    body: bytearray
    keep_alive: bool
    events: int = 0  # SSE events (blank-line terminated), when counted
    gaps: array | None = None  # seconds between events that arrived in different reads
    zero_gaps: int = 0  # gaps between events that arrived in the same read


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
        self._now = 0.0  # arrival time of the read being parsed
        self._body = bytearray()
        # SSE event timing: only for streams
        self._sse = False
        self._scan = 0  # where the search for the next event end starts in _body
        self._events = 0
        self._last_event = 0.0
        self._gaps = array("d")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionClosed(str(exc) if exc else "closed by peer"))

    def request(self, data: bytes, sse: bool = False) -> asyncio.Future[Response]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._state = _HEAD
        self._body = bytearray()
        self._first = 0.0
        self._sse = sse
        if sse:
            self._scan = self._events = 0
            self._gaps = array("d")
        self._start = _clock()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._now = _clock()
        self._buf += data
        try:
            self._parse()
            if self._sse and self._waiter is not None:
                self._count_events()
        except Exception as exc:  # a malformed response fails the request, not the client
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    def _got_body(self, chunk: bytes | bytearray) -> None:
        if not self._first and chunk:
            self._first = self._now
        self._body += chunk

    def _count_events(self) -> None:
        """Count the events the body gained since the last read: one time stamp per read, and one
        gap per read that completed events (the others in that read arrived with it: a gap of 0,
        counted at the end as events - 1 - gaps)."""
        body = self._body
        k = body.count(b"\n\n", self._scan)
        end = len(body)
        if k:
            if self._events:  # a stream's first event has no gap before it
                self._gaps.append(self._now - self._last_event)
            self._events += k
            self._last_event = self._now
            if body[-1] == 10 and body[-2] == 10:  # the usual case: the read ended with an event
                self._scan = end
                return
            scan = body.rfind(b"\n\n") + 2
        else:
            scan = self._scan
        # an event end split across reads: its first "\n" is the body's last byte
        self._scan = scan if scan >= end - 1 else end - 1

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
            response = Response(self._status, self._start, self._first, self._now, self._body, self._keep_alive)
            if self._sse:
                self._count_events()
                events, gaps = self._events, self._gaps
                response.events, response.gaps, response.zero_gaps = events, gaps, max(0, events - 1 - len(gaps))
            waiter.set_result(response)


# --------------------------------------------------------------------------- checks and figures


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    gaps: array = field(default_factory=lambda: array("d"))
    zero_gaps: int = 0
    inner_gaps: array = field(default_factory=lambda: array("d"))  # without each stream's last gap
    errors: int = 0
    error_sample: str = ""
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        message = message[:500]
        if not self.error_sample:
            self.error_sample = message
        if len(self.error_samples) < MAX_ERROR_SAMPLES and message not in self.error_samples:
            self.error_samples.append(message)


@dataclass(frozen=True, slots=True)
class StreamCheck:
    """What a correct response looks like."""

    stream: bool
    end_marker: bytes = DONE_MARKER
    expect_events: int | None = None


class RequestBytes:
    """The bytes of each request: the same every time, or with a counter in place of the mark."""

    def __init__(self, raw: bytes, mark: bytes | None = None) -> None:
        self.raw = raw
        self.count = 0
        self.split: tuple[bytes, bytes] | None = None
        if mark:
            at = raw.find(mark)
            if at < 0:
                raise ValueError(f"--unique mark {mark.decode()!r} is not in the body")
            self.split = raw[:at], raw[at + len(mark):]

    def next(self) -> bytes:
        if self.split is None:
            return self.raw
        self.count += 1
        return b"%b%010d%b" % (self.split[0], self.count, self.split[1])


def build_request(
    url: str, body: bytes, headers: list[str], unique: str | None = None
) -> tuple[str, int, RequestBytes]:
    """Host, port and the request; with ``unique`` its mark is replaced per request by 10 digits."""
    mark = unique.encode() if unique else None
    length = len(body) + (10 - len(mark) if mark and mark in body else 0)
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
        f"Content-Length: {length}",
        *headers,
    ]
    return host, port, RequestBytes(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, mark)


def _check(response: Response, check: StreamCheck, results: Results) -> None:
    if response.status != 200:
        results.error(f"HTTP {response.status}: {bytes(response.body[:300])!r}")
        return
    if check.stream:
        if not response.body.rstrip().endswith(check.end_marker):
            results.error(f"stream did not end with {check.end_marker.decode()}: {bytes(response.body[-300:])!r}")
            return
        if check.expect_events is not None and response.events != check.expect_events:
            results.error(f"stream had {response.events} events, expected {check.expect_events}")
            return
        results.events.append(response.events)
        results.ttfts.append(response.first_byte - response.start)
        if response.gaps:
            results.gaps.extend(response.gaps)
            results.inner_gaps.extend(response.gaps[:-1])
        results.zero_gaps += response.zero_gaps
    results.latencies.append(response.end - response.start)


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


def gap_summary_ms(gaps: array, zeros: int) -> dict[str, float]:
    """Percentiles of ``gaps`` plus ``zeros`` gaps of 0 (nearest rank), in ms, with the count."""
    ordered = sorted(gaps)
    n = len(ordered) + zeros
    if not n:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0, "count": 0}

    def at(p: float) -> float:
        rank = int(max(1, -(-n * p // 100)))
        return 0.0 if rank <= zeros else ordered[rank - zeros - 1] * 1000

    return {
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "max": at(100),
        "mean": sum(ordered) / n * 1000,
        "count": n,
    }


def _stream_figures(results: Results, out: dict[str, object]) -> None:
    out["ttft_ms"] = summary_ms(results.ttfts)
    events = results.events
    out["events_per_stream"] = {"min": min(events, default=0), "max": max(events, default=0)}
    out["chunk_gap_ms"] = gap_summary_ms(results.gaps, results.zero_gaps)
    out["inner_gap_ms"] = gap_summary_ms(results.inner_gaps, results.zero_gaps)


def _cpu() -> float:
    return sum(os.times()[:2])


def _common_figures(results: Results, wall: float, cpu: float) -> dict[str, object]:
    done = len(results.latencies)
    return {
        "requests": done,
        "errors": results.errors,
        "error_sample": results.error_sample,
        "error_samples": results.error_samples,
        "wall_s": wall,
        "rps": done / wall if wall else 0.0,
        "latency_ms": summary_ms(results.latencies),
        "client_cpu_s": cpu,
        "client_cpu_util": cpu / wall if wall else 0.0,
        "client_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# --------------------------------------------------------------------------- closed loop


async def worker(
    host: str,
    port: int,
    request: RequestBytes,
    check: StreamCheck,
    deadline: float,
    max_requests: int,
    results: Results,
) -> None:
    loop = asyncio.get_running_loop()
    proto: ClientProtocol | None = None
    sse = check.stream
    while time.perf_counter() < deadline and len(results.latencies) + results.errors < max_requests:
        if proto is None or proto.closed:
            try:
                _, proto = await loop.create_connection(ClientProtocol, host, port)
            except OSError as exc:
                results.error(f"connect: {exc}")
                await asyncio.sleep(0.05)
                continue
        try:
            response = await proto.request(request.next(), sse)
        except (ConnectionClosed, ValueError) as exc:
            results.error(f"{type(exc).__name__}: {exc}")
            proto = None
            continue
        _check(response, check, results)
        if not response.keep_alive and proto.transport is not None:
            proto.transport.close()
            proto = None
    if proto is not None and proto.transport is not None:
        proto.transport.close()


async def run(
    url: str,
    body: bytes,
    headers: list[str],
    concurrency: int,
    duration: float,
    max_requests: int,
    check: StreamCheck | None = None,
    unique: str | None = None,
) -> dict[str, object]:
    host, port, request = build_request(url, body, headers, unique)
    check = check or stream_check(url, body)
    results = Results()
    cpu0 = _cpu()
    t0 = time.perf_counter()
    deadline = t0 + duration
    await asyncio.gather(
        *(worker(host, port, request, check, deadline, max_requests, results) for _ in range(concurrency))
    )
    wall = time.perf_counter() - t0
    out = _common_figures(results, wall, _cpu() - cpu0)
    if check.stream:
        _stream_figures(results, out)
    return out


# --------------------------------------------------------------------------- hold


@dataclass
class HoldState:
    open: int = 0
    peak_open: int = 0
    first_sent: float = 0.0
    last_sent: float = 0.0
    connects: list[float] = field(default_factory=list)


async def hold_one(
    host: str,
    port: int,
    request: RequestBytes,
    check: StreamCheck,
    start_at: float,
    timeout: float,
    state: HoldState,
    results: Results,
) -> None:
    """One connection, one stream, then close."""
    loop = asyncio.get_running_loop()
    delay = start_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    t0 = time.perf_counter()
    try:
        _, proto = await asyncio.wait_for(loop.create_connection(ClientProtocol, host, port), timeout)
    except (TimeoutError, OSError) as exc:
        results.error(f"connect: {type(exc).__name__}: {exc}")
        return
    state.connects.append(time.perf_counter() - t0)
    state.open += 1
    state.peak_open = max(state.peak_open, state.open)
    try:
        state.last_sent = time.perf_counter()
        state.first_sent = state.first_sent or state.last_sent
        waiter = proto.request(request.next(), check.stream)
        response = await asyncio.wait_for(waiter, timeout)
    except TimeoutError:
        results.error(f"timeout: no complete response within {timeout:g} s")
    except (ConnectionClosed, ValueError) as exc:
        results.error(f"{type(exc).__name__}: {exc}")
    else:
        _check(response, check, results)
    finally:
        state.open -= 1
        if proto.transport is not None:
            proto.transport.close()


async def hold(
    url: str,
    body: bytes,
    headers: list[str],
    streams: int,
    ramp: float,
    timeout: float,
    check: StreamCheck | None = None,
    unique: str | None = None,
) -> dict[str, object]:
    host, port, request = build_request(url, body, headers, unique)
    check = check or stream_check(url, body)
    results = Results()
    state = HoldState()
    cpu0 = _cpu()
    t0 = time.perf_counter()
    step = ramp / streams if streams else 0.0
    await asyncio.gather(
        *(hold_one(host, port, request, check, t0 + i * step, timeout, state, results) for i in range(streams))
    )
    wall = time.perf_counter() - t0
    out: dict[str, object] = {"mode": "hold", "streams": streams}
    out.update(_common_figures(results, wall, _cpu() - cpu0))
    out["peak_open"] = state.peak_open
    out["ramp_s"] = state.last_sent - state.first_sent
    out["connect_ms"] = summary_ms(state.connects)
    if check.stream:
        _stream_figures(results, out)
    return out


# --------------------------------------------------------------------------- entry point


def stream_check(url: str, body: bytes, end_marker: str | None = None, expect_events: int | None = None) -> StreamCheck:
    """The checks for ``body`` sent to ``url``: a stream if the body says so; the end marker
    given, else Anthropic's last event for a ``/messages`` URL, else ``data: [DONE]``."""
    stream = orjson.loads(body).get("stream") is True
    if end_marker is not None:
        marker = end_marker.encode()
    elif urlsplit(url).path.rstrip("/").endswith("/messages"):
        marker = ANTHROPIC_END_MARKER
    else:
        marker = DONE_MARKER
    return StreamCheck(stream, marker, expect_events)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HTTP/1.1 POST load client with TTFT and SSE event timing")
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON request body; 'stream': true selects SSE checks")
    parser.add_argument("-H", "--header", action="append", default=[], help="extra header, 'Name: value'")
    parser.add_argument("-c", "--concurrency", type=int, default=1, help="closed loop: connections")
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="closed loop: seconds")
    parser.add_argument("-n", "--max-requests", type=int, default=10**9, help="closed loop: stop after this many")
    parser.add_argument("--hold", type=int, metavar="N", help="hold mode: N connections, one stream each, all at once")
    parser.add_argument("--ramp", type=float, default=0.0, help="hold mode: spread the N starts over this many seconds")
    parser.add_argument("--timeout", type=float, default=60.0, help="hold mode: seconds allowed per connect and stream")
    parser.add_argument("--end-marker", help="what a correct stream ends with (default: see the module docstring)")
    parser.add_argument("--expect-events", type=int, help="a correct stream has exactly this many SSE events")
    parser.add_argument("--unique", metavar="MARK", help="replace MARK in the body with a per-request counter")
    args = parser.parse_args(argv)
    if args.hold is not None and args.hold < 1:
        parser.error("--hold needs N >= 1")
    raise_open_files_limit()
    body = args.body.encode()
    check = stream_check(args.url, body, args.end_marker, args.expect_events)
    if args.hold:
        coro = hold(args.url, body, args.header, args.hold, args.ramp, args.timeout, check, args.unique)
    else:
        coro = run(args.url, body, args.header, args.concurrency, args.duration, args.max_requests, check, args.unique)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
