"""proxy/upstream.py against raw TCP servers on loopback: the tests write every byte of the answers.

Each test runs on asyncio's loop and on uvloop (the gateway's). `Origin` is the server: it counts
the connections it accepts, keeps every request it reads and hands each to the test's handler.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import random
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from proxy import upstream
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.upstream import HIGH_WATER, UpstreamClient, UpstreamResponse, UpstreamStreamError

DEADLINE = 10.0  # seconds a test may run: a hang fails it instead of blocking the run
STALL = 0.2  # the read timeout of tests that wait for it to expire (what does come must come before it)
Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's coroutine to its end on a fresh loop of the kind the parameter names."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run(main: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(main, DEADLINE))

    return run


# -- the server -----------------------------------------------------------------------------------


class Peer:
    """The server's end of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.requests = 0  # read on this connection so far
        self.closed = asyncio.Event()  # the client closed its end (or the server did)

    async def read_request(self) -> Request | None:
        """The next request, None once the client has closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.requests += 1
        return Request(head, body, self)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_in_pieces(self, data: bytes, size: int) -> None:
        """`data` in writes of `size` bytes, yielding to the loop after each so the client reads them apart."""
        for start in range(0, len(data), size):
            await self.send(data[start:start + size])
            for _ in range(3):
                await asyncio.sleep(0)

    async def wait_eof(self) -> None:
        """Until the client closes its end (whatever it sends meanwhile is dropped)."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP reset rather than a FIN."""
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class Request:
    def __init__(self, head: bytes, body: bytes, peer: Peer) -> None:
        self.head = head  # the request line and headers, with the blank line
        self.body = body
        self.peer = peer

    @property
    def target(self) -> str:
        return self.head.split(b" ", 2)[1].decode()

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:-2]


Handler = Callable[[Request], Awaitable[None]]


class Origin:
    """A raw HTTP server on loopback (port chosen by the kernel) and an UpstreamClient for it."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.peers: list[Peer] = []  # every connection accepted, in order
        self.requests: list[Request] = []
        self.open = 0
        self.max_open = 0  # the most connections open at once
        self.client = UpstreamClient()

    @property
    def accepted(self) -> int:
        return len(self.peers)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Origin:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        self.server.close()
        for peer in self.peers:
            peer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.peers.append(peer)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while not writer.is_closing() and (request := await peer.read_request()) is not None:
                self.requests.append(request)
                await self.handler(request)
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            peer.closed.set()
            writer.close()


def response(body: bytes = b"ok", *headers: str, status: str = "200 OK", version: str = "1.1",
             length: bool = True) -> bytes:
    """An HTTP answer: the status line, `headers`, Content-Length (if `length`) and `body`."""
    lines = [f"HTTP/{version} {status}", *headers, *([f"Content-Length: {len(body)}"] if length else [])]
    return "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n" + body


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked(*pieces: bytes, head: bytes = CHUNKED) -> bytes:
    """A whole chunked answer carrying `pieces`, one chunk each."""
    return head + b"".join(chunk(piece) for piece in pieces) + b"0\r\n\r\n"


def always(answer: bytes) -> Handler:
    async def handler(request: Request) -> None:
        await request.peer.send(answer)

    return handler


async def post(origin: Origin, path: str = "/v1/chat/completions", *, stream: bool = False,
               read_timeout: float = 5.0, max_connections: int = 100) -> UpstreamResponse:
    return await origin.client.post("p", origin.url + path, {"Content-Type": "application/json"}, b"{}",
                                    connect_timeout=5.0, read_timeout=read_timeout, stream=stream,
                                    max_connections=max_connections)


async def fetch(origin: Origin, path: str = "/v1/chat/completions", **options: Any) -> tuple[int, bytes]:
    """POST and read the whole answer: (status, body)."""
    answer = await post(origin, path, **options)
    return answer.status, await answer.read()


async def stream_all(answer: UpstreamResponse) -> list[bytes]:
    return [piece async for piece in answer.chunks()]


async def until(condition: Callable[[], bool]) -> None:
    """Polls `condition` (a state no event announces); the test's deadline bounds the wait."""
    while not condition():
        await asyncio.sleep(0.001)


# -- keep-alive and the retry of a stale connection ---------------------------------------------


def test_sequential_requests_share_one_connection(run: Run) -> None:
    async def main() -> None:
        async with Origin(always(response(b"hello"))) as origin:
            for _ in range(5):
                assert await fetch(origin) == (200, b"hello")
            assert origin.accepted == 1
            assert len(origin.requests) == 5

    run(main())


@pytest.mark.parametrize("answer", [
    response(b"bye", "Connection: close"),
    response(b"bye", version="1.0"),
], ids=["connection-close", "http-1.0"])
def test_answer_that_does_not_keep_alive_is_not_reused(run: Run, answer: bytes) -> None:
    """The server leaves the connection open: the client alone decides not to reuse it."""

    async def main() -> None:
        async with Origin(always(answer)) as origin:
            for _ in range(3):
                assert await fetch(origin) == (200, b"bye")
            assert origin.accepted == 3
            await origin.peers[0].closed.wait()  # and the client closed it

    run(main())


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
], ids=["100", "103", "100-then-102"])
def test_interim_answers_are_skipped_for_the_final_one(run: Run, interim: bytes) -> None:
    async def main() -> None:
        async with Origin(always(interim + response(b"final", "X-Final: yes"))) as origin:
            for _ in range(2):  # and the connection is reused afterwards
                answer = await post(origin)
                assert (answer.status, answer.headers.get("x-final"), "link" in answer.headers) == (200, "yes", False)
                assert await answer.read() == b"final"
            assert origin.accepted == 1

    run(main())


def test_bytes_after_the_answer_are_not_taken_for_the_next_one(run: Run) -> None:
    """A server that sends a second answer nobody asked for, in the same write as the first: the first
    is read whole and the connection is dropped, so the next request cannot read the stray one."""

    async def main() -> None:
        stray = response(b"stray")
        async with Origin(always(response(b"first") + stray)) as origin:
            assert await fetch(origin) == (200, b"first")
            assert await fetch(origin) == (200, b"first")
            assert origin.accepted == 2

    run(main())


def test_bytes_after_the_answer_in_a_later_write_are_not_taken_for_the_next_one(run: Run) -> None:
    async def handler(request: Request) -> None:
        await request.peer.send(response(b"first"))
        await asyncio.sleep(0.05)
        await request.peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")

    async def main() -> None:
        async with Origin(handler) as origin:
            answer = await post(origin)
            await asyncio.sleep(0.1)  # the stray bytes arrive before the answer is read
            assert await answer.read() == b"first"
            assert await fetch(origin) == (200, b"first")
            assert origin.accepted == 2

    run(main())


def test_idle_connections_expire(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.0)

    async def main() -> None:
        async with Origin(always(response())) as origin:
            assert await fetch(origin) == (200, b"ok")
            assert await fetch(origin) == (200, b"ok")
            assert origin.accepted == 2
            await origin.peers[0].closed.wait()

    run(main())


def test_idle_connection_the_server_closed_is_not_used(run: Run) -> None:
    """Whether the client has seen the close before the next request or only sees it after (a retry)."""

    async def handler(request: Request) -> None:
        await request.peer.send(response())
        request.peer.close()  # a server that keeps no idle connections (without saying Connection: close)

    async def main() -> None:
        async with Origin(handler) as origin:
            assert await fetch(origin) == (200, b"ok")
            await origin.peers[0].closed.wait()
            assert await fetch(origin) == (200, b"ok")
            assert origin.accepted == 2

    run(main())


def test_idle_connection_the_server_spoke_on_is_not_used(run: Run) -> None:
    """Some servers send a 408 on a kept-alive connection before closing it. Until the close arrives, that
    connection must not be reused: the new request would get the 408 as its answer."""

    async def main() -> None:
        timed_out = asyncio.Event()

        async def handler(request: Request) -> None:
            await request.peer.send(response())
            if request.peer.requests == 1 and request.peer is origin.peers[0]:
                await timed_out.wait()
                await request.peer.send(response(b"", "Connection: close", status="408 Request Timeout"))

        async with Origin(handler) as origin:
            assert await fetch(origin) == (200, b"ok")
            [idle] = origin.client._pools["p"].idle[("http", "127.0.0.1", origin.port)]
            timed_out.set()
            await until(lambda: idle.got_bytes)  # the client read the 408, the server has not closed yet
            assert await fetch(origin) == (200, b"ok")
            assert origin.accepted == 2

    run(main())


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_reused_connection_closed_before_answering_is_retried_on_a_fresh_one(run: Run, how: str) -> None:
    """The race a kept-alive connection loses: the server closes it just as the next request goes out."""

    async def main() -> None:
        async def handler(request: Request) -> None:
            if request.peer is not origin.peers[0] or request.peer.requests == 1:
                await request.peer.send(response())
            elif how == "fin":
                request.peer.close()
            else:
                request.peer.reset()

        async with Origin(handler) as origin:
            assert await fetch(origin) == (200, b"ok")
            assert await fetch(origin) == (200, b"ok")
            assert origin.accepted == 2
            assert len(origin.requests) == 3  # the second request, twice

    run(main())


def test_retry_is_on_a_fresh_connection_not_another_pooled_one(run: Run) -> None:
    """Two idle connections, both closed by the server: the retry must not take the second one."""

    async def main() -> None:
        both_arrived = asyncio.Event()
        stale: set[Peer] = set()

        async def handler(request: Request) -> None:
            if request.peer in stale:
                request.peer.close()
                return
            if len(origin.requests) == 2:
                both_arrived.set()
            await both_arrived.wait()  # so that the first two requests are on two connections
            await request.peer.send(response())

        async with Origin(handler) as origin:
            assert await asyncio.gather(fetch(origin), fetch(origin)) == [(200, b"ok")] * 2
            assert origin.accepted == 2
            stale.update(origin.peers)
            assert await fetch(origin) == (200, b"ok")
            assert origin.accepted == 3

    run(main())


def test_fresh_connection_closed_before_answering_is_not_retried(run: Run) -> None:
    async def handler(request: Request) -> None:
        request.peer.close()

    async def main() -> None:
        async with Origin(handler) as origin:
            with pytest.raises(UpstreamUnavailable, match="closed the connection before answering"):
                await fetch(origin)
            assert len(origin.requests) == 1

    run(main())


@pytest.mark.parametrize("broken", [
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
], ids=["in-head", "in-body", "in-chunks"])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_answer_that_started_then_broke_is_not_retried(run: Run, broken: bytes, stream: bool) -> None:
    """Even on a reused connection: once a byte of the answer came, the request may have had effects."""

    async def handler(request: Request) -> None:
        if request.peer.requests == 1:
            await request.peer.send(response())
        else:
            await request.peer.send(broken)
            request.peer.close()

    async def main() -> None:
        async with Origin(handler) as origin:
            assert await fetch(origin) == (200, b"ok")
            if broken.endswith(b"Content-Le"):
                with pytest.raises(UpstreamUnavailable, match="closed the connection"):
                    await post(origin, stream=stream)
            elif stream:
                answer = await post(origin, stream=True)
                with pytest.raises(UpstreamStreamError, match="broke the stream: closed the connection"):
                    await stream_all(answer)
            else:
                with pytest.raises(UpstreamUnavailable, match="broke the connection: closed the connection"):
                    await fetch(origin)
            assert origin.accepted == 1
            assert len(origin.requests) == 2

    run(main())


# -- body framings ----------------------------------------------------------------------------------


PIECES = [bytes([65 + i % 26]) * (1 + i * 7 % 61) for i in range(400)]  # 400 chunks of 1 to 61 bytes


@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_chunked_body_of_many_chunks(run: Run, stream: bool) -> None:
    async def main() -> None:
        async with Origin(always(chunked(*PIECES))) as origin:
            for _ in range(2):
                answer = await post(origin, stream=stream)
                body = b"".join(await stream_all(answer)) if stream else await answer.read()
                assert body == b"".join(PIECES)
            assert origin.accepted == 1

    run(main())


@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_answer_split_at_awkward_boundaries(run: Run, size: int, stream: bool) -> None:
    """Writes of 1, 2 or 5 bytes cut the status line, header names, CRLFs and chunk sizes anywhere."""
    pieces = [b"data: {}\n\n", b"x" * 300, b"", b"tail"]
    answer_bytes = chunked(*[piece for piece in pieces if piece],
                           head=b"HTTP/1.1 200 OK\r\nX-Request-Id: req-1\r\nTransfer-Encoding: chunked\r\n\r\n")

    async def handler(request: Request) -> None:
        await request.peer.send_in_pieces(answer_bytes, size)

    async def main() -> None:
        async with Origin(handler) as origin:
            for _ in range(2):
                answer = await post(origin, stream=stream)
                assert answer.status == 200
                assert answer.headers["x-request-id"] == "req-1"
                body = b"".join(await stream_all(answer)) if stream else await answer.read()
                assert body == b"".join(pieces)
            assert origin.accepted == 1

    run(main())


@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_body_read_until_close(run: Run, stream: bool) -> None:
    """Neither Content-Length nor chunked: the body ends with the connection, which is not reused."""
    body = b"".join(PIECES[:50])

    async def handler(request: Request) -> None:
        if request.target == "/until-close":
            await request.peer.send_in_pieces(response(body, "Content-Type: text/plain", length=False), 97)
            request.peer.close()
        else:
            await request.peer.send(response())

    async def main() -> None:
        async with Origin(handler) as origin:
            answer = await post(origin, "/until-close", stream=stream)
            assert (b"".join(await stream_all(answer)) if stream else await answer.read()) == body
            assert await fetch(origin) == (200, b"ok")
            assert origin.accepted == 2

    run(main())


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_compressed_answers_are_decoded(run: Run, encoding: str, stream: bool) -> None:
    plain = b"".join(b'data: {"n": %d}\n\n' % i for i in range(2000))
    packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    answer_bytes = chunked(*[packed[i:i + 100] for i in range(0, len(packed), 100)], head=head)

    async def main() -> None:
        async with Origin(always(answer_bytes)) as origin:
            answer = await post(origin, stream=stream)
            assert answer.headers["content-encoding"] == encoding
            assert (b"".join(await stream_all(answer)) if stream else await answer.read()) == plain

    run(main())


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_body_that_does_not_decode(run: Run, encoding: str, stream: bool) -> None:
    """A body its Content-Encoding does not describe (here: raw deflate, without the zlib wrapper) is
    the provider's failure, reported as such, rather than a zlib.error escaping to the caller."""
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    packed = packer.compress(b"data: {}\n\n" * 100) + packer.flush()
    answer_bytes = response(packed, f"Content-Encoding: {encoding}")

    async def main() -> None:
        async with Origin(always(answer_bytes)) as origin:
            answer = await post(origin, stream=stream)
            if stream:
                with pytest.raises(UpstreamStreamError, match=f"broke the stream: .*not valid {encoding}"):
                    await stream_all(answer)
            else:
                with pytest.raises(UpstreamUnavailable, match=f"broke the connection: .*not valid {encoding}"):
                    await answer.read()
            await origin.peers[0].closed.wait()  # the connection was dropped, not pooled

    run(main())


@pytest.mark.parametrize("answer_bytes", [
    response(b"", status="204 No Content", length=False),
    response(b"", "Content-Encoding: gzip", status="204 No Content", length=False),
    response(b""),
    chunked(),
], ids=["204", "204-gzip", "content-length-0", "no-chunks"])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_empty_bodies(run: Run, answer_bytes: bytes, stream: bool) -> None:
    async def main() -> None:
        async with Origin(always(answer_bytes)) as origin:
            for _ in range(3):
                answer = await post(origin, stream=stream)
                assert (await stream_all(answer) == []) if stream else (await answer.read() == b"")
            assert origin.accepted == 1  # each answer was complete, so its connection was reused

    run(main())


# -- headers ----------------------------------------------------------------------------------------


HEADERS = (
    "Content-Type: application/json",
    "X-Request-ID: req-123",
    "Retry-After: 7",
    "retry-after-ms: 7000",
    "OpenAI-Processing-Ms: 42",
    "X-RateLimit-Limit-Requests: 100",
    "x-ratelimit-remaining-tokens: 99",
    "Set-Cookie: a=1",
    "set-cookie: b=2",
    "Via: 1.1 edge",
    "VIA: 1.1 origin",
    "X-Request-Idx: not-this-one",
)


def test_headers_are_case_insensitive_and_repeats_joined(run: Run) -> None:
    async def main() -> None:
        async with Origin(always(response(b"{}", *HEADERS))) as origin:
            answer = await post(origin)
            headers = answer.headers
            assert headers["x-request-id"] == headers["X-REQUEST-ID"] == headers.get("X-Request-Id") == "req-123"
            assert "x-ratelimit-limit-requests" in headers and "X-RATELIMIT-LIMIT-REQUESTS" in headers
            assert "x-nothing" not in headers and headers.get("X-Nothing") is None
            assert headers["Set-Cookie"] == "a=1, b=2"
            assert headers["via"] == "1.1 edge, 1.1 origin"
            assert headers["content-length"] == "2"
            assert dict(headers)["openai-processing-ms"] == "42"  # iterated names are lower case
            with pytest.raises(KeyError):
                headers["x-nothing"]
            await answer.read()

    run(main())


def test_pass_headers_are_rate_limits_and_request_ids_only(run: Run) -> None:
    async def main() -> None:
        async with Origin(always(response(b"{}", *HEADERS))) as origin:
            answer = await post(origin)
            assert answer.pass_headers() == {
                "x-request-id": "req-123",
                "retry-after": "7",
                "retry-after-ms": "7000",
                "openai-processing-ms": "42",
                "x-ratelimit-limit-requests": "100",
                "x-ratelimit-remaining-tokens": "99",
            }
            await answer.read()

    run(main())


# -- the request's bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [13, 100_000], ids=["small", "large"])
def test_request_bytes(run: Run, size: int) -> None:
    body = (b'{"model":"m"}' * (size // 13 + 1))[:size]

    async def main() -> None:
        async with Origin(always(response())) as origin:
            headers = {"Authorization": "Bearer sk-1", "content-type": "application/json", "X-Custom": "a, b"}
            answer = await origin.client.post("p", f"{origin.url}/v1/chat/completions?api-version=2024-06-01",
                                              headers, body, connect_timeout=5.0, read_timeout=5.0, stream=False)
            assert await answer.read() == b"ok"
            [request] = origin.requests
            assert request.head == (
                b"POST /v1/chat/completions?api-version=2024-06-01 HTTP/1.1\r\n"
                b"Host: 127.0.0.1:%d\r\n"
                b"Authorization: Bearer sk-1\r\n"
                b"content-type: application/json\r\n"
                b"X-Custom: a, b\r\n"
                b"Content-Length: %d\r\n\r\n" % (origin.port, size)
            )
            assert request.body == body

    run(main())


class RedirectedClient(UpstreamClient):
    """Connects to the test server whatever the URL names; the request still names the URL's host."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def _connect(self, origin: tuple[str, str, int], provider: str, where: str,
                       connect_timeout: float) -> upstream._Connection:
        return await super()._connect(("http", "127.0.0.1", self.port), provider, where, connect_timeout)


@pytest.mark.parametrize(("url", "line", "host"), [
    ("http://api.example.com/v1/chat", b"POST /v1/chat HTTP/1.1", b"Host: api.example.com"),
    ("http://api.example.com", b"POST / HTTP/1.1", b"Host: api.example.com"),
    ("http://api.example.com:80/x?a=1&b=2", b"POST /x?a=1&b=2 HTTP/1.1", b"Host: api.example.com"),
    ("http://api.example.com:8080/x", b"POST /x HTTP/1.1", b"Host: api.example.com:8080"),
    ("https://api.example.com:443/x", b"POST /x HTTP/1.1", b"Host: api.example.com"),
    ("https://api.example.com:80/x", b"POST /x HTTP/1.1", b"Host: api.example.com:80"),
    ("http://[2001:db8::1]/x", b"POST /x HTTP/1.1", b"Host: [2001:db8::1]"),
    ("http://[2001:db8::1]:8443/x", b"POST /x HTTP/1.1", b"Host: [2001:db8::1]:8443"),
])
def test_request_line_and_host_header(run: Run, url: str, line: bytes, host: bytes) -> None:
    async def main() -> None:
        async with Origin(always(response())) as origin:
            client = RedirectedClient(origin.port)
            answer = await client.post("p", url, {}, b"", connect_timeout=5.0, read_timeout=5.0, stream=False)
            assert await answer.read() == b"ok"
            await client.close()
            [request] = origin.requests
            assert request.head == line + b"\r\n" + host + b"\r\nContent-Length: 0\r\n\r\n"

    run(main())


def test_host_header_of_an_ipv6_origin(run: Run) -> None:
    # a machine without an IPv6 loopback fails here rather than skipping: the gateway's machines have one

    async def main() -> None:
        async with Origin(always(response()), host="::1") as origin:
            assert await fetch(origin) == (200, b"ok")
            assert origin.requests[0].header_lines[0] == b"Host: [::1]:%d" % origin.port

    run(main())


def test_caller_host_header_replaces_the_default(run: Run) -> None:
    """SigV4 signs the Host header, so a signed request brings its own: exactly one is sent."""

    async def main() -> None:
        async with Origin(always(response())) as origin:
            headers = {"host": "bedrock-runtime.us-east-1.amazonaws.com", "x-amz-date": "20240101T000000Z"}
            answer = await origin.client.post("p", origin.url + "/model/m/invoke", headers, b"{}",
                                              connect_timeout=5.0, read_timeout=5.0, stream=False)
            assert await answer.read() == b"ok"
            [request] = origin.requests
            assert request.header_lines == [b"host: bedrock-runtime.us-east-1.amazonaws.com",
                                            b"x-amz-date: 20240101T000000Z", b"Content-Length: 2"]

    run(main())


# -- timeouts -----------------------------------------------------------------------------------------


def test_connect_timeout(run: Run) -> None:
    """A listening socket whose accept queue is full: Linux drops the SYNs, so connecting hangs."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5.0):  # fills the queue

            async def main() -> None:
                client = UpstreamClient()
                for _ in range(2):  # and the failed connect gave its slot back
                    with pytest.raises(UpstreamUnavailable) as caught:
                        await client.post("p", f"http://127.0.0.1:{port}/v1?key=secret", {}, b"",
                                          connect_timeout=STALL, read_timeout=5.0, stream=False, max_connections=1)
                    assert caught.value.detail == (  # the origin only: a URL may carry a key
                        f"Could not connect to provider 'p' at http://127.0.0.1:{port}: no connection within {STALL:g} s")

            run(main())


def test_connection_refused_is_named(run: Run) -> None:
    with socket.socket() as bound:  # bound but not listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]

        async def main() -> None:
            client = UpstreamClient()
            for _ in range(2):  # and the failed connect gave its slot back
                with pytest.raises(UpstreamUnavailable) as caught:
                    await client.post("p", f"http://127.0.0.1:{port}/v1", {}, b"", connect_timeout=5.0,
                                      read_timeout=5.0, stream=False, max_connections=1)
                assert caught.value.detail == (
                    f"Could not connect to provider 'p' at http://127.0.0.1:{port}: connection refused")

        run(main())


@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_no_answer_within_read_timeout(run: Run, stream: bool) -> None:
    async def handler(request: Request) -> None:
        await request.peer.wait_eof()

    async def main() -> None:
        async with Origin(handler) as origin:
            with pytest.raises(UpstreamTimeout, match=f"did not answer within {STALL:g} s"):
                await post(origin, stream=stream, read_timeout=STALL)
            await origin.peers[0].closed.wait()  # the connection was dropped

    run(main())


def test_body_stalling_past_the_deadline(run: Run) -> None:
    async def handler(request: Request) -> None:
        await request.peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await request.peer.wait_eof()

    async def main() -> None:
        async with Origin(handler) as origin:
            answer = await post(origin, read_timeout=STALL)
            with pytest.raises(UpstreamTimeout, match="stopped sending its response"):
                await answer.read()
            await origin.peers[0].closed.wait()

    run(main())


def test_stream_stalling_between_chunks(run: Run) -> None:
    async def handler(request: Request) -> None:
        await request.peer.send(CHUNKED + chunk(b"data: 1\n\n"))
        await request.peer.wait_eof()

    async def main() -> None:
        async with Origin(handler) as origin:
            answer = await post(origin, stream=True, read_timeout=STALL)
            chunks = answer.chunks()
            assert await anext(chunks) == b"data: 1\n\n"
            with pytest.raises(UpstreamStreamError, match="stalled"):
                await anext(chunks)
            await origin.peers[0].closed.wait()

    run(main())


# -- the connection cap -------------------------------------------------------------------------------


def test_max_connections_caps_open_connections(run: Run) -> None:
    async def handler(request: Request) -> None:
        await asyncio.sleep(0.01)  # a slow provider
        await request.peer.send(response(request.body))

    async def main() -> None:
        async with Origin(handler) as origin:
            answers = await asyncio.gather(*[fetch(origin, max_connections=2) for _ in range(5)])
            assert answers == [(200, b"{}")] * 5
            assert origin.max_open == 2
            assert origin.accepted == 2

    run(main())


# -- streams ------------------------------------------------------------------------------------------


def test_chunks_yield_data_as_it_arrives(run: Run) -> None:
    first_seen = asyncio.Event()

    async def handler(request: Request) -> None:
        await request.peer.send(CHUNKED + chunk(b"data: 1\n\n"))
        await first_seen.wait()
        await request.peer.send(chunk(b"data: 2\n\n") + b"0\r\n\r\n")

    async def main() -> None:
        async with Origin(handler) as origin:
            answer = await post(origin, stream=True)
            assert answer.status == 200
            assert answer.headers["content-type"] == "text/event-stream"
            chunks = answer.chunks()
            assert await anext(chunks) == b"data: 1\n\n"
            first_seen.set()
            assert await anext(chunks) == b"data: 2\n\n"
            with pytest.raises(StopAsyncIteration):
                await anext(chunks)

    run(main())


def test_closing_a_stream_early_closes_its_connection(run: Run) -> None:
    async def handler(request: Request) -> None:
        if request.target == "/stream":
            await request.peer.send(CHUNKED + chunk(b"data: 1\n\n"))
            await request.peer.wait_eof()
        else:
            await request.peer.send(response())

    async def main() -> None:
        async with Origin(handler) as origin:
            assert await fetch(origin) == (200, b"ok")
            answer = await post(origin, "/stream", stream=True)
            chunks = answer.chunks()
            assert await anext(chunks) == b"data: 1\n\n"
            await chunks.aclose()
            await origin.peers[0].closed.wait()  # the server saw the connection end
            assert await fetch(origin) == (200, b"ok")
            assert origin.accepted == 2

    run(main())


def test_a_completed_stream_connection_is_reused(run: Run) -> None:
    async def main() -> None:
        async with Origin(always(chunked(b"data: 1\n\n", b"data: [DONE]\n\n"))) as origin:
            for _ in range(3):
                assert await stream_all(await post(origin, stream=True)) in (
                    [b"data: 1\n\n", b"data: [DONE]\n\n"], [b"data: 1\n\ndata: [DONE]\n\n"])
            assert origin.accepted == 1

    run(main())


def test_backpressure_pauses_reading_until_chunks_are_taken(run: Run) -> None:
    payload = random.Random(7).randbytes(8 << 20)

    async def main() -> None:
        async with Origin(always(response(payload))) as origin:
            answer = await post(origin, stream=True)
            conn = answer._conn
            assert conn.transport is not None
            await until(lambda: conn.paused)
            assert not conn.transport.is_reading()
            assert conn.buffered < HIGH_WATER + (1 << 20)  # what it holds stays bounded
            chunks = answer.chunks()
            received = [await anext(chunks)]
            assert conn.transport.is_reading()  # taking the buffered bytes resumed reading
            received += [piece async for piece in chunks]
            assert b"".join(received) == payload
            assert await fetch(origin, "/again") == (200, payload)
            assert origin.accepted == 1

    run(main())


# -- slots, invalid answers, close ------------------------------------------------------------------


def test_slots_are_never_leaked(run: Run) -> None:
    """With max_connections=1, every way a response can fail or be abandoned must give the slot back."""
    arrived = asyncio.Event()

    async def handler(request: Request) -> None:
        peer = request.peer
        match request.target:
            case "/ok":
                await peer.send(response())
            case "/invalid":
                await peer.send(b"SPDY/9 what\r\n\r\n")
            case "/broken":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                peer.close()
            case "/silent":
                arrived.set()
                await peer.wait_eof()
            case "/stall":
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                await peer.wait_eof()
            case "/stream":
                await peer.send(CHUNKED + chunk(b"data: 1\n\n"))
                await peer.wait_eof()

    async def main() -> None:
        async with Origin(handler) as origin:
            async def one(path: str, **options: Any) -> UpstreamResponse:
                return await post(origin, path, max_connections=1, **options)

            with pytest.raises(UpstreamUnavailable):
                await one("/invalid")
            with pytest.raises(UpstreamUnavailable):
                await (await one("/broken")).read()
            with pytest.raises(UpstreamTimeout):
                await one("/silent", read_timeout=0.05)  # nothing ever comes: no need for STALL
            with pytest.raises(UpstreamTimeout):
                await (await one("/stall", read_timeout=STALL)).read()
            with pytest.raises(UpstreamStreamError):
                await stream_all(await one("/stream", stream=True, read_timeout=STALL))
            (await one("/ok")).close()  # closed unread
            answer = await one("/stream", stream=True)
            del answer  # dropped: neither read nor closed
            gc.collect()
            answer = await one("/stream", stream=True)
            chunks = answer.chunks()
            del answer, chunks  # its iterator made but never started
            gc.collect()
            answer = await one("/stream", stream=True)
            chunks = answer.chunks()
            await anext(chunks)
            await chunks.aclose()
            answer = await one("/stream", stream=True)
            chunks = answer.chunks()
            await anext(chunks)
            del answer, chunks  # abandoned mid-stream: the loop's async generator finalizer closes it
            gc.collect()
            task = asyncio.create_task(one("/silent"))
            await arrived.wait()
            task.cancel()  # the caller went away while waiting for the answer
            with pytest.raises(asyncio.CancelledError):
                await task
            async with asyncio.timeout(5):
                status, body = await fetch(origin, "/ok", max_connections=1)
            assert (status, body) == (200, b"ok")

    run(main())


@pytest.mark.parametrize("answer_bytes", [
    b"SPDY/9 what\r\n\r\n",
    b"HTTP/1.1 two hundred OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
], ids=["not-http", "status", "content-length", "two-lengths"])
def test_invalid_http_head_is_upstream_unavailable(run: Run, answer_bytes: bytes) -> None:
    async def main() -> None:
        async with Origin(always(answer_bytes)) as origin:
            with pytest.raises(UpstreamUnavailable, match="sent an invalid HTTP answer"):
                await post(origin)
            await origin.peers[0].closed.wait()

    run(main())


@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_invalid_http_body(run: Run, stream: bool) -> None:
    async def main() -> None:
        async with Origin(always(CHUNKED + chunk(b"data: 1\n\n") + b"zz\r\n")) as origin:
            answer = await post(origin, stream=stream)
            if stream:
                with pytest.raises(UpstreamStreamError, match="sent an invalid HTTP answer"):
                    await stream_all(answer)
            else:
                with pytest.raises(UpstreamUnavailable, match="sent an invalid HTTP answer"):
                    await answer.read()
            await origin.peers[0].closed.wait()

    run(main())


def test_client_close_aborts_idle_connections(run: Run) -> None:
    async def main() -> None:
        async with Origin(always(response())) as origin:
            await asyncio.gather(*[fetch(origin) for _ in range(3)])
            assert origin.accepted == 3
            await origin.client.close()
            for peer in origin.peers:
                await peer.closed.wait()

    run(main())
