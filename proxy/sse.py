"""An incremental scanner for OpenAI chat-completion SSE streams.

The relay feeds it each chunk as it arrives and forwards what it returns. Complete events go
out as they are: when a chunk holds whole events and none is hidden, the very same bytes
object is returned (no copy). On the way it picks up usage, the served model, finish reasons,
the first content (for TTFT) and, unless the log must not keep content, the assistant text and
tool calls. The usage-only chunk the gateway asked for on the client's behalf is hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import orjson

DONE = b"[DONE]"


# Only the fields the tap reads: msgspec skips the rest without building objects for them.
class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    model: str | None = None
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class ChatStreamTap:
    __slots__ = (
        "hide_usage_chunk", "keep_content", "_tail", "usage", "model", "done", "finish_reasons",
        "saw_content", "error", "malformed", "events", "content_deltas", "_content", "_reasoning", "_tools",
    )

    def __init__(self, *, hide_usage_chunk: bool, keep_content: bool = True) -> None:
        self.hide_usage_chunk = hide_usage_chunk
        self.keep_content = keep_content
        self._tail = b""
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.done = False  # `data: [DONE]` seen
        self.finish_reasons: dict[int, str] = {}
        self.saw_content = False
        self.error: Any = None  # an `error` object the upstream sent inside the stream
        self.malformed = 0  # data lines that were not JSON (forwarded unchanged)
        self.events = 0
        self.content_deltas = 0  # deltas that carried output: roughly one token each
        self._content: dict[int, list[str]] = {}
        self._reasoning: dict[int, list[str]] = {}
        self._tools: dict[int, dict[int, dict[str, Any]]] = {}

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward now: every complete event so far, minus hidden ones."""
        if self._tail:
            data = self._tail + data
            self._tail = b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end == -1:
            self._tail = data
            return b""
        if end + 2 < len(data):
            self._tail = data[end + 2:]
            data = data[: end + 2]
        if data.count(b"\n\n") == 1:  # the usual case: one event per upstream read
            return b"" if self._scan(data[:-2]) else data
        kept: list[bytes] = []
        hidden = False
        for event in data.split(b"\n\n"):
            if event:
                if self._scan(event):
                    hidden = True
                else:
                    kept.append(event)
        if not hidden:
            return data
        return b"".join(e + b"\n\n" for e in kept)

    def flush(self) -> bytes:
        """At the end of the upstream stream: whatever partial event is left."""
        tail, self._tail = self._tail, b""
        if tail.strip():
            self._scan(tail.rstrip(b"\n"))
            return tail if tail.endswith(b"\n\n") else tail.rstrip(b"\n") + b"\n\n"
        return b""

    @staticmethod
    def _payload(event: bytes) -> bytes | None:
        if event.startswith(b"data: ") and b"\n" not in event:
            return event[6:]
        lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        return b"\n".join(lines) if lines else None

    def _scan(self, event: bytes) -> bool:
        """Read one event; True if it is the usage-only chunk to hide from this client."""
        payload = self._payload(event)
        if payload is None:
            return False
        self.events += 1
        if payload == DONE:
            self.done = True
            return False
        try:
            chunk = _decode_chunk(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.malformed += 1  # forwarded unchanged all the same
            return False
        if chunk.error:
            self.error = chunk.error
        if self.model is None and chunk.model:
            self.model = chunk.model
        choices = chunk.choices
        if choices:
            for choice in choices:
                self._choice(choice)
        if chunk.usage is not None:
            self.usage = chunk.usage
            return self.hide_usage_chunk and not choices
        return False

    def _choice(self, choice: _Choice) -> None:
        delta = choice.delta
        if delta is not None:
            content = delta.content
            tool_calls = delta.tool_calls
            if content or tool_calls or delta.reasoning_content:
                self.saw_content = True
                self.content_deltas += 1
            if self.keep_content:
                if content:
                    self._content.setdefault(choice.index, []).append(content)
                if delta.reasoning_content:
                    self._reasoning.setdefault(choice.index, []).append(delta.reasoning_content)
                if tool_calls:
                    self._merge_tools(choice.index, tool_calls)
        if choice.finish_reason:
            self.finish_reasons[choice.index] = choice.finish_reason

    def _merge_tools(self, index: int, deltas: list[_ToolCallDelta]) -> None:
        calls = self._tools.setdefault(index, {})
        for d in deltas:
            slot = calls.setdefault(d.index if d.index is not None else len(calls),
                                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if d.id:
                slot["id"] = d.id
            if d.function is not None:
                if d.function.name:
                    slot["function"]["name"] += d.function.name
                if d.function.arguments:
                    slot["function"]["arguments"] += d.function.arguments

    def error_status(self) -> int:
        """The HTTP status of the `error` object seen (for the log): its code if one, else 502."""
        code = self.error.get("code") if isinstance(self.error, dict) else None
        return code if isinstance(code, int) and 400 <= code < 600 else 502

    def error_event(self, message: str) -> bytes:
        return error_event(message)

    def messages(self) -> list[dict[str, Any]]:
        """The assistant message of each choice, rebuilt from the deltas (for the log)."""
        indexes = sorted(set(self._content) | set(self._reasoning) | set(self._tools) | set(self.finish_reasons))
        out = []
        for i in indexes:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content.get(i, [])) or None}
            if i in self._reasoning:
                message["reasoning_content"] = "".join(self._reasoning[i])
            if i in self._tools:
                message["tool_calls"] = [self._tools[i][k] for k in sorted(self._tools[i])]
            out.append(message)
        return out


def error_event(message: str, *, type: str = "upstream_error", code: int | str | None = 502) -> bytes:
    """The event that ends a broken stream: the OpenAI SDKs raise on an `error` object."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": type, "code": code}}) + b"\n\ndata: [DONE]\n\n"


class SSEDecoder:
    """Splits any SSE byte stream into (event name, data) pairs, whatever the chunk boundaries.

    For providers whose stream the gateway translates (Anthropic, Gemini): they feed what they
    read and get the complete events so far. Multi-line data is joined with newlines.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[tuple[str | None, bytes]]:
        if self._tail:
            data = self._tail + data
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end == -1:
            self._tail = data
            return []
        self._tail = data[end + 2:]
        return [e for e in map(self._event, data[:end].split(b"\n\n")) if e is not None]

    def flush(self) -> list[tuple[str | None, bytes]]:
        tail, self._tail = self._tail, b""
        event = self._event(tail.strip(b"\n")) if tail.strip() else None
        return [event] if event is not None else []

    @staticmethod
    def _event(block: bytes) -> tuple[str | None, bytes] | None:
        name: str | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" ") if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
        if not data and name is None:
            return None
        return name, b"\n".join(data)


class NativeStreamTap:
    """The shared plumbing of the taps on a native (passthrough) stream: the relay forwards every
    chunk unchanged (`feed` returns the very same bytes object) while the subclass's `_scan` reads
    each JSON event; `final_usage` converts the usage seen with the subclass's `_to_usage`."""

    __slots__ = ("keep_content", "_decoder", "model", "done", "saw_content", "error", "events", "content_deltas")
    usage: Any
    _to_usage: Callable[[Any], Any]  # staticmethod: the format's usage -> proxy.call.Usage

    def __init__(self, *, keep_content: bool = True) -> None:
        self.keep_content = keep_content
        self._decoder = SSEDecoder()
        self.model: str | None = None
        self.done = False  # the format's closing event seen
        self.saw_content = False
        self.error: Any = None
        self.events = 0
        self.content_deltas = 0

    @property
    def pending(self) -> bool:
        """A partial event was forwarded: an appended event must start on a fresh line."""
        return bool(self._decoder._tail)

    def feed(self, data: bytes) -> bytes:
        """Read the events in `data`; return `data` itself (forwarded unchanged)."""
        for name, payload in self._decoder.feed(data):
            self._read(name, payload)
        return data

    def flush(self) -> bytes:
        for name, payload in self._decoder.flush():
            self._read(name, payload)
        return b""

    def _read(self, name: str | None, payload: bytes) -> None:
        self.events += 1
        try:
            event = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self._scan(name, event)

    def _scan(self, name: str | None, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def _appended(self, event: bytes) -> bytes:
        """`event`, to append to the forwarded stream (on a fresh line after a partial event)."""
        return b"\n\n" + event if self.pending else event

    def final_usage(self) -> Any:
        usage = self._to_usage(self.usage)
        if not self.done and self.content_deltas > usage.completion_tokens:
            usage.completion_tokens = self.content_deltas  # cut short: at least a token a delta
        return usage
