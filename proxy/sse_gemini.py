"""A tap on a native Gemini `streamGenerateContent?alt=sse` stream (the /api/google/gemini passthrough).

The relay forwards every upstream chunk unchanged (the very same bytes object); on the way the
tap reads the events: each is a whole GenerateContentResponse whose `usageMetadata` is cumulative
(the last one counts), the served model (`modelVersion`), text, thoughts and function calls for
the log, `finishReason`s, and `error` objects. A Gemini stream has no closing event: it is
complete once a candidate has its finishReason (or the prompt was blocked), and the upstream
then ends the body. When the relay asks for it, the tap writes the Gemini-shaped `error` event
that ends a broken stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.call import Usage
from proxy.sse import NativeStreamTap

# google.rpc status names by HTTP status, for errors the gateway writes in Gemini's shape
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def gemini_error(status: int, message: str) -> dict[str, Any]:
    """Google's error object: {"error": {"code", "message", "status"}}."""
    return {"error": {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}}


def gemini_error_event(message: str, status: int = 502) -> bytes:
    return b"data: " + orjson.dumps(gemini_error(status, message)) + b"\r\n\r\n"


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def gemini_usage(metadata: Any) -> Usage:
    """usageMetadata -> Usage. Thoughts are billed as output; promptTokenCount already holds the
    cached tokens (cachedContentTokenCount) and tool-use prompt tokens are prompt tokens too."""
    metadata = metadata if isinstance(metadata, dict) else {}
    return Usage(
        prompt_tokens=_count(metadata, "promptTokenCount") + _count(metadata, "toolUsePromptTokenCount"),
        completion_tokens=_count(metadata, "candidatesTokenCount") + _count(metadata, "thoughtsTokenCount"),
        cached_tokens=_count(metadata, "cachedContentTokenCount"),
    )


def _text_of(parts: Any) -> str:
    return "".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)) if isinstance(
        parts, list) else ""


def prompt_messages(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A generateContent body's systemInstruction and contents as chat messages, for the log:
    text parts joined; a turn with other parts keeps its parts list as the content."""
    messages: list[dict[str, Any]] = []
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict) and _text_of(system.get("parts")):
        messages.append({"role": "system", "content": _text_of(system.get("parts"))})
    contents = body.get("contents")
    for turn in contents if isinstance(contents, list) else ():
        if not isinstance(turn, dict):
            continue
        parts = turn.get("parts")
        texts_only = isinstance(parts, list) and all(isinstance(p, dict) and set(p) == {"text"} for p in parts)
        role = "assistant" if turn.get("role") == "model" else "user"
        messages.append({"role": role, "content": _text_of(parts) if texts_only else parts})
    return messages or None


class _Answer:
    """One candidate's text, thoughts and function calls, gathered for the log."""

    __slots__ = ("texts", "thoughts", "calls", "finish")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.thoughts: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.finish: str | None = None

    def add(self, parts: Any) -> None:
        for part in parts if isinstance(parts, list) else ():
            if not isinstance(part, dict):
                continue
            call = part.get("functionCall")
            if isinstance(call, dict):
                args = call.get("args")
                self.calls.append({"id": call.get("id"), "type": "function", "function": {
                    "name": call.get("name") or "", "arguments": orjson.dumps(args if args is not None else {}).decode()}})
            elif isinstance(part.get("text"), str):
                (self.thoughts if part.get("thought") is True else self.texts).append(part["text"])

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.texts) or None}
        if self.thoughts:
            message["reasoning_content"] = "".join(self.thoughts)
        if self.calls:
            message["tool_calls"] = self.calls
        if self.finish:
            message["finish_reason"] = self.finish
        return message


def completion_messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The candidates of a whole GenerateContentResponse, as assistant messages for the log."""
    tap = GeminiStreamTap()
    tap._scan(None, data)
    return tap.messages()


class GeminiStreamTap(NativeStreamTap):
    __slots__ = ("usage", "_answers")
    _to_usage = staticmethod(gemini_usage)

    def __init__(self, *, keep_content: bool = True) -> None:
        super().__init__(keep_content=keep_content)
        self.usage: dict[str, Any] = {}
        self._answers: dict[int, _Answer] = {}

    def error_event(self, message: str) -> bytes:
        return self._appended(gemini_error_event(message))

    def error_status(self) -> int:
        """The HTTP status of the error object seen (for the log): its `code`, else 502."""
        code = self.error.get("code") if isinstance(self.error, dict) else None
        return code if isinstance(code, int) and 400 <= code < 600 else 502

    def _scan(self, name: str | None, event: dict[str, Any]) -> None:
        if "error" in event:
            self.error = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            return
        if isinstance(event.get("usageMetadata"), dict):
            self.usage = event["usageMetadata"]
        if isinstance(event.get("modelVersion"), str):
            self.model = event["modelVersion"]
        feedback = event.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.done = True  # the prompt was blocked: this is the whole answer
        candidates = event.get("candidates")
        for position, candidate in enumerate(candidates if isinstance(candidates, list) else ()):
            if not isinstance(candidate, dict):
                continue
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            if parts:
                self.saw_content = True
                self.content_deltas += 1
            if candidate.get("finishReason"):
                self.done = True
            if self.keep_content:
                index = candidate.get("index")
                answer = self._answers.setdefault(index if isinstance(index, int) else position, _Answer())
                answer.add(parts)
                if isinstance(candidate.get("finishReason"), str):
                    answer.finish = candidate["finishReason"]

    def messages(self) -> list[dict[str, Any]]:
        return [self._answers[i].message() for i in sorted(self._answers)]
