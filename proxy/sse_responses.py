"""A tap on an OpenAI Responses API SSE stream (the /api/responses passthrough).

The relay forwards every upstream chunk unchanged (the very same bytes object); on the way the
tap reads the events: the served model (response.created), output text deltas and function
calls for the log, the usage of the terminal event (response.completed, response.incomplete or
response.failed: `response.usage` with input_tokens, output_tokens and
input_tokens_details.cached_tokens), and errors (response.failed, `error` events). A terminal
event completes the stream. It never adds anything to the stream except, when the relay asks for
it, the Responses-format `error` event that ends a broken stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.call import Usage
from proxy.sse import NativeStreamTap

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})

# Responses error code -> HTTP status, for the log of a stream that ended with an error
ERROR_STATUS = {
    "invalid_request_error": 400,
    "invalid_prompt": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found": 404,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "vector_store_timeout": 504,
}


def responses_error_event(message: str, code: str = "server_error", sequence_number: int = 0) -> bytes:
    data = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": sequence_number}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def responses_usage(usage: Any) -> Usage:
    """Responses usage -> Usage (input tokens include the cached ones, as for OpenAI chat)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}

    def count(value: Any) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    return Usage(prompt_tokens=count(usage.get("input_tokens")), completion_tokens=count(usage.get("output_tokens")),
                 cached_tokens=count(details.get("cached_tokens")))


def output_message(output: Any) -> dict[str, Any]:
    """A Responses `output` list -> one assistant message for the log (text; function calls as
    OpenAI-shaped tool_calls)."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or ():
                if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        elif kind == "function_call":
            tool_calls.append({"id": item.get("call_id") or item.get("id"), "type": "function",
                               "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def error_status(error: Any) -> int:
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and 400 <= code < 600:
        return code
    return ERROR_STATUS.get(code, 502) if isinstance(code, str) else 502


class ResponsesStreamTap(NativeStreamTap):
    __slots__ = ("usage", "sequence", "_text", "_output")
    _to_usage = staticmethod(responses_usage)

    def __init__(self, *, keep_content: bool = True) -> None:
        super().__init__(keep_content=keep_content)
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # {"code", "message"} of response.failed or an error event
        self.sequence = -1  # the last sequence_number seen
        self._text: list[str] = []
        self._output: Any = None  # the terminal event's response.output

    def error_event(self, message: str, kind: str = "server_error") -> bytes:
        return self._appended(responses_error_event(message, kind, self.sequence + 1))

    def error_status(self) -> int:
        return error_status(self.error)

    def _scan(self, name: str | None, event: dict[str, Any]) -> None:
        if isinstance(event.get("sequence_number"), int):
            self.sequence = event["sequence_number"]
        kind = event.get("type") or name
        if not isinstance(kind, str):  # e.g. a list: no event type of ours (and unhashable for `in TERMINAL`)
            kind = name
        if kind == "response.output_text.delta":
            self.saw_content = True
            self.content_deltas += 1
            if self.keep_content and isinstance(event.get("delta"), str):
                self._text.append(event["delta"])
        elif kind in ("response.function_call_arguments.delta", "response.refusal.delta",
                      "response.reasoning_summary_text.delta"):
            self.saw_content = True
            self.content_deltas += 1
        elif kind == "response.created" or kind in TERMINAL:
            response = event.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("model"), str):
                    self.model = response["model"]
                if isinstance(response.get("usage"), dict):
                    self.usage = response["usage"]
                if kind in TERMINAL:
                    self._output = response.get("output")
                if kind == "response.failed":
                    error = response.get("error")
                    self.error = error if isinstance(error, dict) else {"code": "server_error",
                                                                          "message": "response failed"}
            if kind in TERMINAL:
                self.done = True
        elif kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else event
            self.error = {"code": error.get("code") or "server_error", "message": error.get("message") or ""}

    def messages(self) -> list[dict[str, Any]]:
        if isinstance(self._output, list) and self._output:
            return [output_message(self._output)]
        if not self._text:
            return []
        return [{"role": "assistant", "content": "".join(self._text)}]
