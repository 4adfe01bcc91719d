"""A scriptable Anthropic Messages API (`POST /v1/messages`) on loopback, for tests.

A tests.mock_server.MockServer (an aiohttp server on its own event loop in a background thread):
it records every request (path, headers, JSON body) and picks its behaviour from the model:

  claude-*                 a text answer (TEXT, streamed word by word), stop_reason end_turn
  claude-cache             the same, with cache creation and cache read tokens in the usage
  claude-tools             text, then two tool_use blocks (streamed as input_json_delta pieces)
  claude-thinking          a thinking block with a signature, then text
  claude-stop-REASON       the text answer with that stop_reason (max_tokens, refusal, ...)
  claude-status-CODE       that status with Anthropic's error body (429 adds retry-after: 7)
  claude-raw-CODE          that status with a non-JSON (HTML) body
  claude-garbage           (not streamed) a 200 whose body is not JSON
  claude-stream-error      a stream that sends some text, then an `error` event (overloaded_error)
  claude-stream-error-first  a 200 stream whose first event is an `error` event
  claude-cut               a stream that drops the connection after some text
  claude-truncated         a stream that ends cleanly without message_delta / message_stop
  claude-split             the normal stream, written a few bytes at a time with CRLF line ends
  claude-slow              a stream of 200 text deltas, one every 50 ms (client-disconnect tests)

`POST /v1/messages/count_tokens` answers `{"input_tokens": len(JSON of system, messages, tools) // 4}`.

It checks what the real API would refuse (400 invalid_request_error): no x-api-key (or
`Authorization: Bearer`, what the SDKs since API version 2026-10-21 send) or anthropic-version,
temperature / top_p / top_k on version 2026-10-21 or later, no max_tokens, turns that do not alternate user/assistant, empty text
blocks, tool_result blocks that are not first in their turn or answer no tool_use of the turn
before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from tests.mock_server import MockServer

WORDS = ["Hello", " from", " the", " mock", " Claude", "."]
TEXT = "".join(WORDS)
USAGE = {"input_tokens": 12, "output_tokens": 6, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
CACHE_USAGE = {"input_tokens": 5, "output_tokens": 6, "cache_creation_input_tokens": 100,
               "cache_read_input_tokens": 200}
THINKING = "Let me think step by step."
SIGNATURE = "sig-abc123"
TOOLS = [("toolu_01", "get_weather", {"city": "Paris"}), ("toolu_02", "get_time", {"tz": "Europe/Paris"})]
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_mock"}


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def check(request: web.Request, body: Any) -> str | None:
    """What the real API would refuse, as its message; None when the request is acceptable."""
    if not request.headers.get("x-api-key") and not request.headers.get("authorization", "").startswith("Bearer "):
        return "x-api-key header is required"
    version = request.headers.get("anthropic-version")
    if not version:
        return "anthropic-version header is required"
    if version >= "2026-10-21" and isinstance(body, dict):
        for key in ("temperature", "top_p", "top_k"):
            if key in body:
                return f"{key}: this parameter is not supported in API version {version}"
    if not isinstance(body, dict) or not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    previous_tool_ids: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if i and messages[i - 1].get("role") == role:
            return f"messages.{i}: roles must alternate between user and assistant"
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            return f"messages.{i}.content: Input should be a string or a list"
        seen_other = False
        tool_ids = set()
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "text" and not block.get("text"):
                return f"messages.{i}.content.{j}: text content blocks must be non-empty"
            if kind == "tool_result":
                if role != "user" or seen_other:
                    return f"messages.{i}.content.{j}: tool_result blocks must come first in a user turn"
                if block.get("tool_use_id") not in previous_tool_ids:
                    return f"messages.{i}.content.{j}: tool_result answers no tool_use of the previous turn"
            else:
                seen_other = True
            if kind == "tool_use":
                tool_ids.add(block.get("id"))
        previous_tool_ids = tool_ids
    return None


class MockAnthropic(MockServer):
    client_max_size = 32 * 1024 * 1024

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/messages", self.messages)
        router.add_post("/v1/messages/count_tokens", self.count_tokens)

    # -- answers ----------------------------------------------------------------------

    @staticmethod
    def content(model: str) -> list[dict[str, Any]]:
        if model == "claude-tools":
            return [{"type": "text", "text": "Let me check."}] + [
                {"type": "tool_use", "id": i, "name": name, "input": args} for i, name, args in TOOLS]
        if model == "claude-thinking":
            return [{"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}, {"type": "text", "text": TEXT}]
        return [{"type": "text", "text": TEXT}]

    @staticmethod
    def stop_reason(model: str) -> str:
        if model.startswith("claude-stop-"):
            return model.removeprefix("claude-stop-")
        return "tool_use" if model == "claude-tools" else "end_turn"

    @staticmethod
    def usage(model: str) -> dict[str, int]:
        return dict(CACHE_USAGE if model == "claude-cache" else USAGE)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            body = None
        self.record(request, body)
        problem = check(request, body)
        if problem is not None:
            return web.json_response(error_body("invalid_request_error", problem), status=400)
        model: str = body.get("model", "")
        if model.startswith("claude-status-"):
            status = int(model.rsplit("-", 1)[1])
            kind = ERROR_TYPES.get(status, "api_error")
            headers = {"request-id": "req_mock_error"}
            if status == 429:
                headers["retry-after"] = "7"
                headers["anthropic-ratelimit-requests-remaining"] = "0"
            return web.json_response(error_body(kind, f"mock {kind}"), status=status, headers=headers)
        if model == "claude-garbage" and not body.get("stream"):
            return web.Response(text="not json", content_type="text/plain")
        if model.startswith("claude-raw-"):
            return web.Response(status=int(model.rsplit("-", 1)[1]), text="<html>Bad Gateway</html>",
                                content_type="text/html")
        if body.get("stream"):
            return await self.stream(request, model)
        data = {"id": "msg_mock01", "type": "message", "role": "assistant", "model": f"{model}-20250101",
                "content": self.content(model), "stop_reason": self.stop_reason(model), "stop_sequence": None,
                "usage": self.usage(model)}
        return web.Response(body=orjson.dumps(data), content_type="application/json",
                            headers={"request-id": "req_mock_ok"})

    async def count_tokens(self, request: web.Request) -> web.Response:
        """`{"input_tokens": N}`: N is the length of the JSON of the messages (and system), over 4."""
        body = await request.json(loads=orjson.loads)
        self.record(request, body)
        if not request.headers.get("x-api-key") and not request.headers.get("authorization", "").startswith("Bearer "):
            return web.json_response(error_body("authentication_error", "x-api-key header is required"), status=401)
        if not isinstance(body, dict) or not body.get("messages") or "max_tokens" in body or "stream" in body:
            return web.json_response(error_body("invalid_request_error", "bad count_tokens request"), status=400)
        size = len(orjson.dumps([body.get("system"), body["messages"], body.get("tools")]))
        return web.json_response({"input_tokens": size // 4})

    def events(self, model: str) -> list[bytes]:
        usage = self.usage(model)
        start_usage = {**usage, "output_tokens": 1}
        out = [event("message_start", {"message": {
            "id": "msg_mock01", "type": "message", "role": "assistant", "model": f"{model}-20250101", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
            event("ping", {})]
        if model == "claude-stream-error-first":
            return [event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})]
        index = 0
        if model == "claude-thinking":
            out.append(event("content_block_start", {"index": 0, "content_block": {
                "type": "thinking", "thinking": "", "signature": ""}}))
            for piece in ("Let me think", " step by step."):
                out.append(event("content_block_delta", {"index": 0, "delta": {"type": "thinking_delta",
                                                                                  "thinking": piece}}))
            out.append(event("content_block_delta", {"index": 0, "delta": {"type": "signature_delta",
                                                                              "signature": SIGNATURE}}))
            out.append(event("content_block_stop", {"index": 0}))
            index = 1
        words = ["Let", " me", " check."] if model == "claude-tools" else WORDS
        out.append(event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}))
        for word in words:
            out.append(event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": word}}))
        if model == "claude-stream-error":
            return out + [event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})]
        if model in ("claude-cut", "claude-truncated"):
            return out
        out.append(event("content_block_stop", {"index": index}))
        if model == "claude-tools":
            for i, (tool_id, name, args) in enumerate(TOOLS, start=index + 1):
                out.append(event("content_block_start", {"index": i, "content_block": {
                    "type": "tool_use", "id": tool_id, "name": name, "input": {}}}))
                text = orjson.dumps(args).decode()
                for piece in ("", text[:5], text[5:12], text[12:]):
                    out.append(event("content_block_delta", {"index": i, "delta": {
                        "type": "input_json_delta", "partial_json": piece}}))
                out.append(event("content_block_stop", {"index": i}))
        out.append(event("message_delta", {"delta": {"stop_reason": self.stop_reason(model), "stop_sequence": None},
                                           "usage": {"output_tokens": usage["output_tokens"]}}))
        out.append(event("message_stop", {}))
        return out

    async def stream(self, request: web.Request, model: str) -> web.StreamResponse:
        response = await self.open_stream(request, headers={"request-id": "req_mock_stream"})
        sent = 0
        try:
            if model == "claude-slow":
                await response.write(self.events(model)[0])
                for i in range(200):
                    await response.write(event("content_block_delta", {"index": 0, "delta": {
                        "type": "text_delta", "text": f" w{i}"}}))
                    sent += 1
                    await asyncio.sleep(0.05)
                return response
            events = self.events(model)
            if model == "claude-split":
                data = b"".join(events).replace(b"\n", b"\r\n")
                for i in range(0, len(data), 7):
                    await response.write(data[i:i + 7])
                return response
            for data in events:
                await response.write(data)
                sent += 1
            if model == "claude-cut":
                await asyncio.sleep(0.05)
                request.transport.close()
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            self.stream_closed_early.append({"model": model, "sent": sent})
        return response
