"""The AWS event-stream binary framing (`application/vnd.amazon.eventstream`), decoded incrementally.

A message: a 12-byte prelude (total length, headers length, both big-endian uint32, and the
CRC32 of those 8 bytes), the headers, the payload, and the CRC32 of everything before it.
A header: name length (1 byte), name, value type (1 byte), value (its encoding by type).
EventStreamReader walks the decoded messages (events, exceptions, errors) for a translator.
"""

from __future__ import annotations

import abc
import struct
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import orjson

from proxy.upstream import UpstreamResponse, UpstreamStreamError

PRELUDE = 12
MAX_MESSAGE = 16 * 1024 * 1024  # a message larger than this is corrupt framing, not a real event


class EventStreamError(Exception):
    """The bytes are not valid event-stream framing (bad length or CRC)."""


def _header_value(data: bytes, pos: int, kind: int) -> tuple[Any, int]:
    if kind == 0:
        return True, pos
    if kind == 1:
        return False, pos
    if kind == 2:
        return struct.unpack_from(">b", data, pos)[0], pos + 1
    if kind == 3:
        return struct.unpack_from(">h", data, pos)[0], pos + 2
    if kind == 4:
        return struct.unpack_from(">i", data, pos)[0], pos + 4
    if kind in (5, 8):  # int64, timestamp (ms since the epoch)
        return struct.unpack_from(">q", data, pos)[0], pos + 8
    if kind in (6, 7):  # bytes, string: 2-byte length
        (length,) = struct.unpack_from(">H", data, pos)
        raw = data[pos + 2:pos + 2 + length]
        if len(raw) != length:
            raise EventStreamError("header value runs past the headers")
        return (raw.decode("utf-8", "replace") if kind == 7 else raw), pos + 2 + length
    if kind == 9:  # uuid
        return data[pos:pos + 16], pos + 16
    raise EventStreamError(f"unknown header value type {kind}")


def decode_headers(data: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    pos = 0
    try:
        while pos < len(data):
            length = data[pos]
            name = data[pos + 1:pos + 1 + length].decode("utf-8", "replace")
            kind = data[pos + 1 + length]
            headers[name], pos = _header_value(data, pos + 2 + length, kind)
    except (IndexError, struct.error):
        raise EventStreamError("truncated headers") from None
    return headers


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One message with string headers (what the tests' mock and a Bedrock stream use)."""
    head = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode(), value.encode()
        head += bytes([len(raw_name)]) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value
    total = PRELUDE + len(head) + len(payload) + 4
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack(">I", zlib.crc32(body))


class EventStreamDecoder:
    """Feed it bytes as they arrive; it returns the complete messages as (headers, payload)."""

    __slots__ = ("_buffer", "_error")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: EventStreamError | None = None  # broken framing after good messages: raised next time

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message held back."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        """The messages completed by `data`. Broken framing raises EventStreamError, but only once
        the good messages before it have been returned (the next call raises it)."""
        if self._error is not None:
            raise self._error
        out: list[tuple[dict[str, Any], bytes]] = []
        try:
            self._decode(data, out)
        except EventStreamError as exc:
            if not out:
                raise
            self._error = exc
        return out

    def close(self) -> None:
        """At the end of the body: raise the broken framing held back by the last `feed`, if any."""
        if self._error is not None:
            raise self._error

    def _decode(self, data: bytes, out: list[tuple[dict[str, Any], bytes]]) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= PRELUDE:
            total, headers_length, prelude_crc = struct.unpack_from(">III", buffer, 0)
            if zlib.crc32(bytes(buffer[:8])) != prelude_crc:
                raise EventStreamError("prelude CRC mismatch")
            if total < PRELUDE + 4 + headers_length or total > MAX_MESSAGE:
                raise EventStreamError(f"bad message length {total}")
            if len(buffer) < total:
                break
            message = bytes(buffer[:total])
            del buffer[:total]
            (message_crc,) = struct.unpack_from(">I", message, total - 4)
            if zlib.crc32(message[:-4]) != message_crc:
                raise EventStreamError("message CRC mismatch")
            headers = decode_headers(message[PRELUDE:PRELUDE + headers_length])
            out.append((headers, message[PRELUDE + headers_length:-4]))


def exception_message(payload: bytes) -> str:
    """The message of an exception message's payload (`{"message": ...}`), else ""."""
    try:
        data = orjson.loads(payload) if payload else None
    except orjson.JSONDecodeError:
        return ""
    message = (data.get("message") or data.get("Message")) if isinstance(data, dict) else None
    return message if isinstance(message, str) else ""


class EventStreamReader(abc.ABC):
    """Reads decoded messages until its stream is done or failed, and returns the bytes its client
    gets. A subclass says what an event becomes (`_event`) and what ends the stream on an exception
    or error message (`_failure`); it sets `done` itself."""

    __slots__ = ("done", "failed")

    def __init__(self) -> None:
        self.done = False
        self.failed = False

    def feed(self, messages: Iterable[tuple[Mapping[str, Any], bytes]]) -> bytes:
        out: list[bytes] = []
        for headers, payload in messages:
            if self.done or self.failed:
                break
            kind = headers.get(":message-type", "event")
            if kind == "exception":
                self.failed = True
                out.append(self._failure(str(headers.get(":exception-type") or "exception"),
                                         exception_message(payload)))
            elif kind == "error":
                self.failed = True
                out.append(self._failure(str(headers.get(":error-code") or "error"),
                                         str(headers.get(":error-message") or "")))
            else:
                self._event(out, headers.get(":event-type"), payload)
        return b"".join(out)

    @abc.abstractmethod
    def _event(self, out: list[bytes], event_type: Any, payload: bytes) -> None:
        """Append what one event message becomes to `out`."""

    @abc.abstractmethod
    def _failure(self, kind: str, message: str) -> bytes:
        """The bytes that end the stream on an exception or error message."""


async def read_event_stream(response: UpstreamResponse, reader: EventStreamReader,
                            provider: str) -> AsyncIterator[bytes]:
    """What `reader` makes of an event-stream answer, read by read, until the body ends or the
    reader is done or failed. Closing it closes the upstream response at once; broken framing
    raises UpstreamStreamError (after the good messages before it)."""
    decoder = EventStreamDecoder()
    chunks = response.chunks()
    try:
        try:
            async for data in chunks:
                out = reader.feed(decoder.feed(data))
                if out:
                    yield out
                if reader.done or reader.failed:
                    return
            decoder.close()
        except EventStreamError as exc:
            raise UpstreamStreamError(f"provider '{provider}' sent a broken event stream: {exc}") from None
    finally:
        await chunks.aclose()
