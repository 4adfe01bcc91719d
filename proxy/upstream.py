"""HTTP to providers: keep-alive HTTP/1.1 connections on asyncio protocols, pooled per provider.

A proxied request costs this client about 0.07 ms of CPU against aiohttp's 0.2 ms (benchmarks/
README.md): one write of the request, httptools (llhttp) parsing the answer in C, and no
per-request objects beyond the response. Nothing outside this module knows how: providers see
UpstreamClient and UpstreamResponse only.

What it does: HTTP/1.1 over TCP or TLS, Content-Length, chunked and read-until-close bodies,
gzip and deflate answers, keep-alive with idle connections dropped after 30 s, at most
`max_connections` open per provider, a request retried once on a fresh connection when a reused
one turns out to have been closed by the provider before answering, and a bounded read buffer
(reading pauses while a slow client has not taken 256 KB).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from urllib.parse import urlsplit

import httptools

from proxy.egress import EgressDenied, EgressPolicy, literal_ip
from proxy.errors import UpstreamTimeout, UpstreamUnavailable

# Provider response headers worth handing to the client (rate-limit state, request ids).
PASS_HEADERS = ("retry-after", "retry-after-ms", "x-request-id", "openai-processing-ms")
PASS_PREFIXES = ("x-ratelimit-",)
IDLE_SECONDS = 30.0  # a kept-alive connection unused this long is closed rather than reused
HIGH_WATER = 256 * 1024  # bytes of answer buffered before reading pauses
_TLS: ssl.SSLContext | None = None


class UpstreamStreamError(Exception):
    """The provider's stream broke after its first byte (reset, stall, truncation)."""


class _Unsolicited(Exception):
    """Raised inside the parser to stop it at bytes that follow a whole answer."""


class _Broken(Exception):
    """The connection failed; `before_answer`: no byte of the answer had arrived."""

    def __init__(self, reason: str, before_answer: bool) -> None:
        super().__init__(reason)
        self.before_answer = before_answer


def safe_origin(url: str) -> str:
    """scheme://host:port of a URL: never its path, query or userinfo (which may carry a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"


class Headers(Mapping[str, str]):
    """Response headers, looked up by any case (several of one name: joined with ", ")."""

    __slots__ = ("_by_name",)

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        by_name: dict[str, str] = {}
        for raw_name, raw_value in pairs:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            by_name[name] = f"{by_name[name]}, {value}" if name in by_name else value
        self._by_name = by_name

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._by_name.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time. httptools calls the on_* methods."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = 0.0  # monotonic time it was last released to the pool
        self.parser = httptools.HttpResponseParser(self)  # parses one answer after another
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.has_head = False
        self.informational = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.until_close = False  # a body with neither length nor chunks ends when the connection does
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.error: _Broken | None = None
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.complete:  # bytes after the whole answer: nothing asked for them
            self._unsolicited()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.complete:  # on_message_begin stopped the parser at bytes after the answer
                self._unsolicited()
                return
            self._fail(f"sent an invalid HTTP answer ({exc})")
            self.abort()

    def _unsolicited(self) -> None:
        """The answer is whole and stays readable; the connection is never reused (what came after
        it would be taken for the start of the next request's answer)."""
        self.keep_alive = False
        if self.transport is not None:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_close and self.has_head and not self.complete:
            self.on_message_complete()
        elif not self.complete:
            self._fail(f"closed the connection ({type(exc).__name__})" if exc else "closed the connection")

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Unsolicited  # stops feed_data: data_received leaves the rest unread

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            self.raw_headers = []
            self.informational = True
            return
        self.status = status
        names = {name.lower() for name, _ in self.raw_headers}
        self.until_close = b"content-length" not in names and b"transfer-encoding" not in names
        self.keep_alive = self.parser.should_keep_alive()  # read here: llhttp resets it once the message completes
        self.has_head = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.complete = True
        self._wake()

    # -- used by the client and the response ----------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = _Broken(reason, before_answer=not self.got_bytes)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until the parser moves on (or the connection fails), at most `timeout` seconds."""
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def take(self) -> bytes:
        """What the body has buffered, resuming reading when it had paused."""
        data = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    """One provider's connections: idle ones per origin (most recently used first), and a cap."""

    def __init__(self, max_connections: int, egress: str | None = None) -> None:
        self.idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self.slots = asyncio.Semaphore(max_connections)
        self.egress = egress  # a tenant's provider (admin API): every connection is checked

    def reuse(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self.idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            # bytes that came while it was idle (a 408 before a close) would be taken for the next answer
            if not conn.closed and not conn.got_bytes and now - conn.used < IDLE_SECONDS:
                return conn
            conn.abort()
        return None

    def release(self, origin: tuple[str, str, int], conn: _Connection) -> None:
        if conn.closed or not conn.complete or not conn.keep_alive:
            conn.abort()
        else:
            conn._reset()
            conn.used = time.monotonic()
            self.idle.setdefault(origin, []).append(conn)
        self.slots.release()


class UpstreamResponse:
    __slots__ = ("_conn", "_pool", "_origin", "_decoder", "_released", "status", "headers", "provider", "read_timeout",
                 "deadline")

    def __init__(self, conn: _Connection, pool: _Pool, origin: tuple[str, str, int], provider: str,
                 read_timeout: float, deadline: float | None) -> None:
        self._conn = conn
        self._pool = pool
        self._origin = origin
        self._released = False
        self.status = conn.status
        self.headers = Headers(conn.raw_headers)
        self.provider = provider
        self.read_timeout = read_timeout
        self.deadline = deadline  # non-stream: the whole answer's; streams: None (an idle timeout per wait)
        encoding = self.headers.get("content-encoding", "").lower()
        self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS) \
            if encoding in ("gzip", "deflate") else None

    def pass_headers(self) -> dict[str, str]:
        return {name: value for name, value in self.headers.items()
                if name in PASS_HEADERS or name.startswith(PASS_PREFIXES)}

    def _decode(self, data: bytes) -> bytes:
        try:
            return self._decoder.decompress(data) if self._decoder is not None and data else data
        except zlib.error as exc:
            encoding = self.headers.get("content-encoding", "").lower()
            raise _Broken(f"sent a body that is not valid {encoding} ({exc})", before_answer=False) from None

    def _release(self, reuse: bool) -> None:
        if self._released:
            return
        self._released = True
        if not reuse:
            self._conn.abort()
        self._pool.release(self._origin, self._conn)

    async def read(self) -> bytes:
        conn = self._conn
        parts: list[bytes] = []
        try:
            while True:
                if conn.body:
                    parts.append(self._decode(conn.take()))
                if conn.complete:
                    break
                if conn.error is not None:
                    raise UpstreamUnavailable(f"Provider '{self.provider}' broke the connection: {conn.error}")
                timeout = self.deadline - time.monotonic() if self.deadline is not None else self.read_timeout
                try:
                    await conn.wait(max(timeout, 0.0))
                except TimeoutError:
                    raise UpstreamTimeout(f"Provider '{self.provider}' stopped sending its response") from None
        except _Broken as exc:
            self._release(reuse=False)
            raise UpstreamUnavailable(f"Provider '{self.provider}' broke the connection: {exc}") from None
        except BaseException:
            self._release(reuse=False)
            raise
        self._release(reuse=True)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Closing the iterator closes the upstream connection at once."""
        conn = self._conn
        completed = False
        try:
            while True:
                if conn.body:
                    data = self._decode(conn.take())
                    if data:
                        yield data
                    continue
                if conn.complete:
                    completed = True
                    return
                if conn.error is not None:
                    raise UpstreamStreamError(f"provider '{self.provider}' broke the stream: {conn.error}")
                try:
                    await conn.wait(self.read_timeout)
                except TimeoutError:
                    raise UpstreamStreamError(
                        f"provider '{self.provider}' stalled: no data within the stream idle timeout") from None
        except _Broken as exc:
            raise UpstreamStreamError(f"provider '{self.provider}' broke the stream: {exc}") from None
        finally:
            self._release(reuse=completed)  # an unfinished stream drops the connection: the provider stops

    def close(self) -> None:
        self._release(reuse=False)

    def __del__(self) -> None:
        # A response nobody read nor closed (a stream reply dropped before its first chunk was
        # asked for): give its connection slot back rather than leak it.
        if not self._released:
            self._release(reuse=False)


class UpstreamClient:
    """The pools, one per provider, created lazily on the running event loop."""

    def __init__(self, egress: EgressPolicy | None = None) -> None:
        self.egress = egress  # the gateway's policy for tenant-supplied URLs (None: no connect-time check)
        self._pools: dict[str, _Pool] = {}
        self._tenant_providers: dict[str, str] = {}  # provider id -> the field its base URL came from
        self._heads: dict[str, tuple[tuple[str, str, int], bytes, bytes, str]] = {}

    def sizes(self) -> dict[str, int]:
        idle = sum(len(conns) for pool in self._pools.values() for conns in pool.idle.values())
        return {"pools": len(self._pools), "idle_connections": idle, "request_heads": len(self._heads)}

    def _head(self, url: str) -> tuple[tuple[str, str, int], bytes, bytes, str]:
        """(origin, the request line, its Host header, the origin as logged) of a URL, cached."""
        found = self._heads.get(url)
        if found is None:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            port = parts.port or (443 if scheme == "https" else 80)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host = parts.hostname or ""
            default_port = port == (443 if scheme == "https" else 80)
            authority = host if default_port else f"{host}:{port}"
            if ":" in host:  # an IPv6 literal
                authority = f"[{host}]" if default_port else f"[{host}]:{port}"
            found = ((scheme, host, port), f"POST {target} HTTP/1.1\r\n".encode("latin-1"),
                     f"Host: {authority}\r\n".encode("latin-1"), safe_origin(url))
            if len(self._heads) > 10_000:
                self._heads.clear()
            self._heads[url] = found
        return found

    async def _resolve_checked(self, loop: asyncio.AbstractEventLoop, host: str, port: int,
                               field: str) -> list[str]:
        """The addresses a tenant URL's host resolves to, all checked by the egress policy (one
        refused address refuses the host: a rebinding name cannot slip a metadata address in)."""
        policy = self.egress
        assert policy is not None
        by_name = policy.host_allowed_by_name(host)
        if not by_name:
            reason = policy.host_reason(host)
            if reason is not None:
                raise EgressDenied(field, f"egress policy: {reason}")
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if not by_name:
                ip = literal_ip(address)
                reason = policy.address_reason(ip) if ip is not None else "not an IP address"
                if reason is not None:
                    shown = "" if literal_ip(host) is not None else f"host {host} resolves to {address}: "
                    raise EgressDenied(field, f"egress policy: {shown}{reason}")
            if address not in addresses:
                addresses.append(address)
        return addresses

    async def _connect(self, origin: tuple[str, str, int], provider: str, where: str,
                       connect_timeout: float, egress: str | None = None) -> _Connection:
        global _TLS
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if _TLS is None:
                _TLS = ssl.create_default_context()
            tls = _TLS
        try:
            async with asyncio.timeout(connect_timeout):
                if egress is None or self.egress is None:  # the operator's own provider: no check, no cost
                    _, conn = await loop.create_connection(lambda: _Connection(loop), host, port, ssl=tls,
                                                           server_hostname=host if tls else None)
                else:  # connect to the checked address itself; TLS SNI and Host stay the host name
                    failure: OSError | None = None
                    for address in await self._resolve_checked(loop, host, port, egress):
                        try:
                            _, conn = await loop.create_connection(lambda: _Connection(loop), address, port,
                                                                   ssl=tls, server_hostname=host if tls else None)
                            break
                        except OSError as exc:
                            failure = exc
                    else:
                        raise failure or OSError("no address")
        except TimeoutError:
            raise UpstreamUnavailable(
                f"Could not connect to provider '{provider}' at {where}: no connection within {connect_timeout:g} s"
            ) from None
        except OSError as exc:
            # asyncio's strerror for a refused or unreachable host is "Connect call failed (host, port)":
            # name the errno instead ("connection refused"). DNS errors (negative errno) keep their text.
            if isinstance(exc.errno, int) and exc.errno > 0:
                reason = os.strerror(exc.errno)
            else:
                reason = exc.strerror or type(exc).__name__
            raise UpstreamUnavailable(f"Could not connect to provider '{provider}' at {where}: {reason.lower()}") from None
        return conn

    async def post(
        self,
        provider: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
        stream: bool,
        max_connections: int = 1000,
        egress: str | None = None,
    ) -> UpstreamResponse:
        """`egress`: the URL is a tenant's (the field it came from): its connections are checked by
        the egress policy and pooled apart from the operator's, so neither reuses the other's."""
        key = provider if egress is None else f"{provider}\0egress"
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(max_connections, self._tenant_providers.get(provider))
        if egress is None:
            egress = pool.egress
        origin, line, host, where = self._head(url)
        if "host" in headers:  # signed requests (SigV4) bring their own
            host = b""
        head = b"".join((line, host, "".join([f"{name}: {value}\r\n" for name, value in headers.items()]).encode(
            "latin-1"), b"Content-Length: %d\r\n\r\n" % len(body)))
        started = time.monotonic()
        deadline = None if stream else started + read_timeout
        await pool.slots.acquire()
        try:
            for attempt in (1, 2):
                conn = pool.reuse(origin) if attempt == 1 else None  # a retry: the other idle ones may be closed too
                reused = conn is not None
                if conn is None:
                    conn = await (self._connect(origin, provider, where, connect_timeout) if egress is None
                                  else self._connect(origin, provider, where, connect_timeout, egress))
                conn.send(head, body)
                try:
                    while not conn.has_head:
                        if conn.error is not None:
                            raise conn.error
                        timeout = deadline - time.monotonic() if deadline is not None else read_timeout
                        await conn.wait(max(timeout, 0.0))
                except TimeoutError:
                    conn.abort()
                    raise UpstreamTimeout(f"Provider '{provider}' did not answer within {read_timeout:g} s") from None
                except _Broken as exc:
                    conn.abort()
                    if reused and exc.before_answer and attempt == 1:
                        continue  # the provider had closed this idle connection: once more on a fresh one
                    raise UpstreamUnavailable(
                        f"Provider '{provider}' at {where} closed the connection before answering ({exc})"
                    ) from None
                except BaseException:
                    conn.abort()
                    raise
                return UpstreamResponse(conn, pool, origin, provider, read_timeout, deadline)
            raise AssertionError("unreachable")
        except BaseException:
            pool.slots.release()
            raise

    def set_tenant_provider(self, provider: str, field: str | None) -> None:
        """Mark a provider created through the admin API (`field`: where its base URL came from),
        or unmark it (None); its pool is dropped so no connection opened under the other rule stays."""
        if self._tenant_providers.get(provider) == field:
            return
        if field is None:
            self._tenant_providers.pop(provider, None)
        else:
            self._tenant_providers[provider] = field
        pool = self._pools.pop(provider, None)
        if pool is not None:
            for idle in pool.idle.values():
                for conn in idle:
                    conn.abort()

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            for idle in pool.idle.values():
                for conn in idle:
                    conn.abort()
