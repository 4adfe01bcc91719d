"""A tap on a native Anthropic Messages SSE stream (the /api/anthropic passthrough).

The relay forwards every upstream chunk unchanged (the very same bytes object); on the way the
tap reads the events: usage (message_start: input and cache tokens; message_delta: output
tokens), the served model, text and tool_use content for the log, stop_reason, `error` events
and message_stop (the stream is complete). It never adds anything to the stream except, when the
relay asks for it, the Anthropic-format `error` event that ends a broken stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.call import Usage
from proxy.sse import NativeStreamTap

# Anthropic error type -> HTTP status, for the log of a stream that ended with an error event
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def anthropic_error_event(message: str, kind: str = "api_error") -> bytes:
    data = {"type": "error", "error": {"type": kind, "message": message}}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_usage(usage: Any) -> Usage:
    """Anthropic usage -> Usage: prompt = input + cache creation + cache read tokens."""
    usage = usage if isinstance(usage, dict) else {}

    def count(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and value > 0 else 0

    created, read = count("cache_creation_input_tokens"), count("cache_read_input_tokens")
    return Usage(prompt_tokens=count("input_tokens") + created + read, completion_tokens=count("output_tokens"),
                 cached_tokens=read, cache_creation_tokens=created)


def completion_message(content: Any, stop_reason: Any = None) -> dict[str, Any]:
    """Anthropic content blocks -> one assistant message for the log (OpenAI-shaped tool_calls)."""
    texts: list[str] = []
    thinking: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking.append(block["thinking"])
        elif kind in ("tool_use", "server_tool_use"):
            arguments = block.get("input")
            tool_calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"),
                "arguments": arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode()}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    if tool_calls:
        message["tool_calls"] = tool_calls
    if stop_reason:
        message["stop_reason"] = stop_reason
    return message


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


class AnthropicStreamTap(NativeStreamTap):
    __slots__ = ("usage", "stop_reason", "_blocks")
    _to_usage = staticmethod(anthropic_usage)

    def __init__(self, *, keep_content: bool = True) -> None:
        super().__init__(keep_content=keep_content)
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.error: Any = None  # the `error` object of an error event
        self._blocks: dict[int, dict[str, Any]] = {}

    def error_event(self, message: str, kind: str = "api_error") -> bytes:
        return self._appended(anthropic_error_event(message, kind))

    def error_status(self) -> int:
        """The HTTP status of the error event seen (for the log)."""
        kind = self.error.get("type") if isinstance(self.error, dict) else None
        return ERROR_STATUS.get(kind, 502) if isinstance(kind, str) else 502

    def _scan(self, name: str | None, event: dict[str, Any]) -> None:
        kind = event.get("type") or name
        if kind == "content_block_delta":
            self.saw_content = True
            self.content_deltas += 1
            if self.keep_content:
                delta = event.get("delta") or {}
                index = event.get("index", 0)
                # a block index that is not an int, or text that is not a string, is no block of ours
                block = self._blocks.get(index) if type(index) is int else None
                if block is not None and isinstance(delta, dict):
                    dtype = delta.get("type")
                    if dtype == "text_delta":
                        block["text"] = _str(block.get("text")) + _str(delta.get("text"))
                    elif dtype == "input_json_delta":
                        block["_json"] = _str(block.get("_json")) + _str(delta.get("partial_json"))
                    elif dtype == "thinking_delta":
                        block["thinking"] = _str(block.get("thinking")) + _str(delta.get("thinking"))
        elif kind == "content_block_start":
            block = event.get("content_block")
            if isinstance(block, dict):
                if block.get("type") != "text" or block.get("text"):
                    self.saw_content = True
                index = event.get("index", 0)
                if self.keep_content and type(index) is int:
                    self._blocks[index] = dict(block)
        elif kind == "message_start":
            message = event.get("message") or {}
            if isinstance(message, dict):
                if isinstance(message.get("model"), str):
                    self.model = message["model"]
                self._usage(message.get("usage"))
        elif kind == "message_delta":
            self._usage(event.get("usage"))
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.stop_reason = delta["stop_reason"]
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = event.get("error") if isinstance(event.get("error"), dict) else {"type": "api_error"}

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for key, value in usage.items():
                if isinstance(value, int):
                    self.usage[key] = value

    def messages(self) -> list[dict[str, Any]]:
        if not self._blocks and self.stop_reason is None:
            return []
        blocks = []
        for index in sorted(self._blocks):
            block = dict(self._blocks[index])
            raw = block.pop("_json", None)
            if raw is not None:
                try:
                    block["input"] = orjson.loads(raw) if raw else {}
                except orjson.JSONDecodeError:
                    block["input"] = raw
            blocks.append(block)
        return [completion_message(blocks, self.stop_reason)]
