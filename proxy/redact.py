"""Keys a provider gives back: an upstream that echoes the credential it was sent (in an error
message, a `param`, a request-id header or a stream's error event) must not pass it to the client,
the log's error_message or the fallback's reasons. The gateway's dispatch scrubs every upstream
answer of the attempt's key before anything else sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from proxy.call import Reply

REDACTED = "<redacted>"
MIN_SECRET = 8  # shorter "keys" (placeholders such as "none" or "x") would mangle ordinary text


def secrets_of(*keys: str | None) -> tuple[str, ...]:
    """The keys worth scrubbing, longest first (so one that contains another goes whole)."""
    found: list[str] = []
    for key in keys:
        if key and len(key) >= MIN_SECRET and key not in found:
            found.append(key)
    if len(found) > 1:
        found.sort(key=len, reverse=True)
    return tuple(found)


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_bytes(data: bytes, secrets: Iterable[bytes]) -> bytes:
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, REDACTED.encode())
    return data


def scrub_reply(reply: Reply, secrets: tuple[str, ...]) -> Reply:
    """The reply with every secret replaced in its headers, body and stream chunks (in place)."""
    if not secrets:
        return reply
    raw = [s.encode() for s in secrets]
    headers = reply.headers
    if headers and any(secret in value for value in headers.values() for secret in secrets):
        reply.headers = {name: scrub_text(value, secrets) for name, value in headers.items()}
    if reply.body:
        reply.body = scrub_bytes(reply.body, raw)
    if reply.stream is not None:
        reply.stream = _Scrubbed(reply.stream, raw)
    return reply


class _Scrubbed:
    """The stream's chunks with the secrets replaced; closing it closes the stream (even unstarted,
    which an async generator's aclose would not)."""

    __slots__ = ("_stream", "_secrets")

    def __init__(self, stream: AsyncIterator[bytes], secrets: list[bytes]) -> None:
        self._stream = stream
        self._secrets = secrets

    def __aiter__(self) -> _Scrubbed:
        return self

    async def __anext__(self) -> bytes:
        return scrub_bytes(await self._stream.__anext__(), self._secrets)

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()
