"""HTTP to providers: one pooled, kept-alive client session per provider.

Measured on this machine, aiohttp's client costs about 0.21 ms of CPU per proxied request
against httpx's 1.3 ms, so upstream calls use aiohttp. Nothing outside this module knows that:
providers see UpstreamClient and UpstreamResponse only.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import aiohttp

from proxy.errors import UpstreamTimeout, UpstreamUnavailable

# Provider response headers worth handing to the client (rate-limit state, request ids).
PASS_HEADERS = ("retry-after", "retry-after-ms", "x-request-id", "openai-processing-ms")
PASS_PREFIXES = ("x-ratelimit-",)


class UpstreamStreamError(Exception):
    """The provider's stream broke after its first byte (reset, stall, truncation)."""


def safe_origin(url: str) -> str:
    """scheme://host:port of a URL: never its path, query or userinfo (which may carry a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"


class UpstreamResponse:
    __slots__ = ("_response", "status", "headers", "provider")

    def __init__(self, response: aiohttp.ClientResponse, provider: str) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers
        self.provider = provider

    def pass_headers(self) -> dict[str, str]:
        out = {}
        for name, value in self._response.headers.items():
            lower = name.lower()
            if lower in PASS_HEADERS or lower.startswith(PASS_PREFIXES):
                out[lower] = value
        return out

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(f"Provider '{self.provider}' stopped sending its response") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"Provider '{self.provider}' broke the connection: {type(exc).__name__}") from None
        finally:
            self._response.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Closing the iterator closes the upstream connection at once."""
        response = self._response
        completed = False
        try:
            async for data in response.content.iter_any():
                yield data
            completed = True
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamStreamError(f"provider '{self.provider}' stalled: no data within the stream idle timeout") from None
        except aiohttp.ClientError as exc:
            raise UpstreamStreamError(f"provider '{self.provider}' broke the stream: {type(exc).__name__}") from None
        finally:
            if completed:
                response.release()
            else:
                response.close()  # drop the connection, so the provider stops generating

    def close(self) -> None:
        self._response.close()


class UpstreamClient:
    """The pooled sessions, created lazily on the running event loop."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._timeouts: dict[tuple[float, float, bool], aiohttp.ClientTimeout] = {}

    def _timeout(self, connect: float, read: float, stream: bool) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get((connect, read, stream))
        if timeout is None:
            if stream:  # a stream may run long; what we bound is the silence between chunks
                timeout = aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)
            else:
                timeout = aiohttp.ClientTimeout(total=read, connect=connect)
            if len(self._timeouts) > 1000:  # per-request `timeout` params could vary without end
                self._timeouts.clear()
            self._timeouts[(connect, read, stream)] = timeout
        return timeout

    def _session(self, provider: str, max_connections: int) -> aiohttp.ClientSession:
        session = self._sessions.get(provider)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=300, keepalive_timeout=30)
            session = aiohttp.ClientSession(
                connector=connector,
                # identity encoding: no decompression cost, and streams are never held back by gzip
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
                auto_decompress=True,
            )
            self._sessions[provider] = session
        return session

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
    ) -> UpstreamResponse:
        session = self._session(provider, max_connections)
        timeout = self._timeout(connect_timeout, read_timeout, stream)
        try:
            response = await session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
        except aiohttp.ClientConnectorError as exc:
            # asyncio's strerror for a refused or unreachable host is "Connect call failed (host, port)":
            # name the errno instead ("connection refused"). DNS errors (negative errno) keep their text.
            error = exc.os_error
            if error is not None and isinstance(error.errno, int) and error.errno > 0:
                reason = os.strerror(error.errno)
            else:
                reason = error.strerror if error is not None and error.strerror else type(exc).__name__
            raise UpstreamUnavailable(
                f"Could not connect to provider '{provider}' at {safe_origin(url)}: {reason.lower()}"
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(f"Provider '{provider}' did not answer within {read_timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                f"Provider '{provider}' at {safe_origin(url)} closed the connection before answering ({type(exc).__name__})"
            ) from None
        return UpstreamResponse(response, provider)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
