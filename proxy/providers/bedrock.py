"""Amazon Bedrock Converse API (`POST /model/{modelId}/converse`, `/converse-stream`) behind the
unified router, signed with AWS Signature Version 4 (proxy.providers.sigv4; no boto3).

The client speaks OpenAI chat; this module translates the request to a Converse request and the
answer (whole, or an event stream in AWS's binary framing) back to chat.completion(.chunk).

Credentials and region (first that applies)
- Keys: the request's own credential fields (`customer_credentials` / `credential_override` /
  a load-balance entry) `aws_access_key_id` + `aws_secret_access_key` (+ `aws_session_token`);
  else the credential's `api_key` written as "ACCESS_KEY_ID:SECRET_ACCESS_KEY" (optionally
  ":SESSION_TOKEN" after it) - which is how a configured provider gives its key pair:
  `api_key: ${AWS_ACCESS_KEY_ID}:${AWS_SECRET_ACCESS_KEY}`.
- Region: the credential's `aws_region_name`; else the one in the base URL
  (`https://bedrock-runtime.<region>.amazonaws.com`); else us-east-1. A request region that
  differs from the region of an AWS base URL switches the URL to that region.
- Base URL: the target's (a credential's api_base), else the provider's, else
  https://bedrock-runtime.<region>.amazonaws.com.

Request
- `system` / `developer` messages -> `system` text blocks; `user` / `assistant` / `tool` ->
  `messages`, consecutive turns of one role merged (a turn's tool results first).
- Parts: `text`; `image_url` with a base64 data URL -> `image` {format, source.bytes} (png, jpeg,
  gif, webp; Bedrock cannot fetch an http(s) URL: 400); `file` with a data URL -> `document`.
  A `cache_control` on a part or message -> a `cachePoint` block after it.
- Assistant `tool_calls` -> `toolUse` {toolUseId, name, input}; `tool` messages -> `toolResult`
  {toolUseId, content: [text | json | image]}.
- max_completion_tokens / max_tokens -> inferenceConfig.maxTokens; temperature; top_p -> topP;
  stop -> stopSequences. top_k and `thinking` (or one from `reasoning_effort`, as for Anthropic)
  -> additionalModelRequestFields; with thinking on and no limit given, maxTokens is budget + 4096.
- Assistant `thinking_blocks` (signed, as this module returns them) -> reasoningContent blocks
  first in their turn, so a conversation with thinking and tools keeps its signatures.
- tools -> toolConfig.tools[].toolSpec {name, description, inputSchema.json}; tool_choice auto
  -> {auto:{}}, required -> {any:{}}, {function:{name}} -> {tool:{name}}; "none" sends no
  toolConfig unless the conversation holds tool blocks (Bedrock then requires it; no toolChoice).
- Dropped: n, penalties, logit_bias, logprobs, seed, response_format, user, stream_options
  (usage is always streamed), and any other field Converse has no place for.

Response
- text blocks joined -> content; toolUse -> tool_calls; reasoningContent -> reasoning_content,
  and the signed (or redacted) blocks -> `thinking_blocks` [{type: thinking, thinking, signature} |
  {type: redacted_thinking, data}]; a stream sends each one whole as `delta.thinking_blocks` at its
  contentBlockStop.
- stopReason: end_turn / stop_sequence -> stop, max_tokens / model_context_window_exceeded ->
  length, tool_use -> tool_calls, guardrail_intervened / content_filtered -> content_filter.
- usage: prompt_tokens = inputTokens + cacheReadInputTokens + cacheWriteInputTokens;
  prompt_tokens_details {cached_tokens, cache_creation_tokens}.
- A stream: a role chunk with the first content, content / tool_calls deltas, the finish chunk at
  messageStop, the usage chunk at `metadata`, then [DONE]. An exception event (throttlingException,
  modelStreamErrorException, ...) ends it with `data: {"error": {...}}` (no [DONE]). Broken
  framing (CRC) or a body that ends before messageStop raises UpstreamStreamError.
- Errors: status kept, `{"message"}` plus the `x-amzn-errortype` header -> OpenAI-shaped error
  (code: the AWS error type; "too long" input on a 400 -> context_length_exceeded).

The native Anthropic passthrough (client_format "anthropic": `/api/anthropic/v1/messages` and
`count_tokens`) goes to Bedrock's own Anthropic API instead of Converse: InvokeModel
(`/model/{modelId}/invoke`), InvokeModelWithResponseStream (`.../invoke-with-response-stream`) and
CountTokens (`.../count-tokens`), signed, and with region and base URL, exactly as above. The body
is the client's Messages body (no `model` or `stream`; `anthropic_version` and the client's
`anthropic-beta` in it), the answer an Anthropic Message passed through unchanged, a stream's
event-stream chunks re-emitted as Anthropic SSE events, and errors in Anthropic's shape; the
shapes are in proxy.providers.bedrock_anthropic. Only Claude model ids are served so (400 else).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from proxy.call import Call, Reply, Target
from proxy.errors import BadRequest
from proxy.providers import bedrock_anthropic as native
from proxy.providers.anthropic import max_tokens_for, openai_usage, thinking_blocks, thinking_config
from proxy.providers.common import (
    chunk_event,
    content_parts,
    file_data,
    image_url,
    json_object,
    post_upstream,
    tool_arguments,
    tool_call_id,
    tool_function,
)
from proxy.providers.eventstream import EventStreamReader, read_event_stream
from proxy.providers.sigv4 import sign_headers
from proxy.settings import Provider, Timeouts
from proxy.upstream import UpstreamClient, UpstreamResponse, UpstreamStreamError

SERVICE = "bedrock"
DEFAULT_REGION = "us-east-1"
AWS_HOST = re.compile(r"^bedrock-runtime(-fips)?\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
PATH_SAFE = ":@!$&'()*+,;=-._~"  # what stays unencoded in a path segment (HTTP clients keep it as is)

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                 "image/webp": "webp"}
DOCUMENT_FORMATS = {"application/pdf": "pdf", "text/csv": "csv", "text/plain": "txt", "text/html": "html",
                    "text/markdown": "md", "application/msword": "doc",
                    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
                    "application/vnd.ms-excel": "xls",
                    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx"}
STATUS_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                     429: "rate_limit_error", 503: "service_unavailable"}
# exception events inside a stream -> the HTTP status Bedrock gives the same error
STREAM_EXCEPTION_STATUS = {
    "throttlingException": 429,
    "validationException": 400,
    "accessDeniedException": 403,
    "modelStreamErrorException": 424,
    "modelTimeoutException": 408,
    "internalServerException": 500,
    "serviceUnavailableException": 503,
}
CACHE_POINT = {"cachePoint": {"type": "default"}}


# -- request ------------------------------------------------------------------------------


def _bad(message: str) -> BadRequest:
    return BadRequest(f"Invalid request for a Bedrock model: {message}")


def data_url(url: str, where: str) -> tuple[str, str]:
    """(media_type, base64 data) of a `data:<type>;base64,<data>` URL."""
    head, sep, data = url.partition(",")
    if not url.startswith("data:") or not sep or not head.endswith(";base64"):
        raise _bad(f"{where}: a data URL must be base64 (data:<media type>;base64,<data>)")
    media_type = head[5:-7].split(";", 1)[0].lower()
    if not media_type:
        raise _bad(f"{where}: the data URL has no media type")
    return media_type, data


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = image_url(part, where, _bad)
    if not url.startswith("data:"):
        raise _bad(f"{where}: Bedrock takes images inline only: give image_url.url as a base64 data URL")
    media_type, data = data_url(url, where)
    fmt = IMAGE_FORMATS.get(media_type)
    if fmt is None:
        raise _bad(f"{where}: image type {media_type!r} is not supported (png, jpeg, gif, webp)")
    return {"image": {"format": fmt, "source": {"bytes": data}}}


def _document(part: dict[str, Any], where: str, index: int) -> dict[str, Any]:
    file, data = file_data(part, where, _bad)
    media_type, payload = data_url(data, where)
    fmt = DOCUMENT_FORMATS.get(media_type)
    if fmt is None:
        raise _bad(f"{where}: document type {media_type!r} is not supported")
    name = file.get("filename") if isinstance(file.get("filename"), str) else None
    # Bedrock's document name: letters, digits, spaces, hyphens, parentheses, brackets
    name = re.sub(r"[^A-Za-z0-9\s\-()\[\]]", "-", (name or f"document-{index}").rsplit(".", 1)[0])[:200]
    return {"document": {"format": fmt, "name": name or f"document-{index}", "source": {"bytes": payload}}}


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI message content -> Converse content blocks."""
    out: list[dict[str, Any]] = []
    for i, at, part in content_parts(content, where, _bad):
        kind = part.get("type")
        if kind == "text":
            if part["text"].strip():  # Bedrock refuses blank text blocks
                out.append({"text": part["text"]})
        elif kind == "image_url":
            out.append(_image(part, at))
        elif kind == "file":
            out.append(_document(part, at, i))
        else:
            raise _bad(f"{at}: content parts of type {kind!r} are not supported by Bedrock")
        if part.get("cache_control") and out:
            out.append(dict(CACHE_POINT))
    return out


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function, name = tool_function(call, where, _bad)
    call_id = tool_call_id(call, where, _bad)
    return {"toolUse": {"toolUseId": call_id, "name": name, "input": tool_arguments(function, where, _bad)}}


def _tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise _bad(f"{where}.tool_call_id is required on a tool message")
    content = message.get("content")
    if isinstance(content, str):
        inner = [{"text": content or " "}]  # an empty result still needs one block
    else:
        inner = [b for b in _blocks(content, where) if "cachePoint" not in b] or [{"text": " "}]
    return {"toolResult": {"toolUseId": tool_call_id, "content": inner}}


def _reasoning_blocks(given: Any) -> list[dict[str, Any]]:
    """An assistant message's signed `thinking_blocks` (as this adapter returns them) -> Converse
    reasoningContent blocks, which Claude needs back in a conversation with thinking and tools."""
    out: list[dict[str, Any]] = []
    for block in thinking_blocks(given):
        if block["type"] == "thinking":
            out.append({"reasoningContent": {"reasoningText": {"text": block["thinking"],
                                                               "signature": block["signature"]}}})
        else:
            out.append({"reasoningContent": {"redactedContent": block["data"]}})
    return out


def _thinking_block(reasoning: dict[str, Any]) -> dict[str, Any] | None:
    """A Converse reasoningContent -> a `thinking_blocks` entry (None without a signature or data)."""
    text = reasoning.get("reasoningText")
    if isinstance(text, dict) and text.get("signature"):
        return {"type": "thinking", "thinking": text.get("text") or "", "signature": text["signature"]}
    if reasoning.get("redactedContent"):
        return {"type": "redacted_thinking", "data": reasoning["redactedContent"]}
    return None


def _system_and_turns(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            blocks = _blocks(message.get("content"), where)
            if any("text" not in b and "cachePoint" not in b for b in blocks):
                raise _bad(f"{where}: a system message may hold text only")
            if message.get("cache_control") and blocks and "cachePoint" not in blocks[-1]:
                blocks.append(dict(CACHE_POINT))
            system.extend(blocks)
            continue
        if role == "user":
            blocks = _blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = _reasoning_blocks(message.get("thinking_blocks"))
            blocks += _blocks(message.get("content"), where)
            tool_calls = message.get("tool_calls") or []
            if not isinstance(tool_calls, list):
                raise _bad(f"{where}.tool_calls must be an array")
            blocks += [_tool_use(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(tool_calls)]
        elif role == "tool":
            blocks, role = [_tool_result(message, where)], "user"
        else:
            raise _bad(f"{where}.role {role!r} is not supported (system, developer, user, assistant, tool)")
        if message.get("cache_control") and blocks and "cachePoint" not in blocks[-1]:
            blocks.append(dict(CACHE_POINT))
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user" and any("toolResult" in b for b in turn["content"]):
            turn["content"].sort(key=lambda b: "toolResult" not in b)
    return system, turns


def _tool_config(body: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any] | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise _bad("tools must be an array")
    specs = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and "toolSpec" in tool:
            specs.append(tool)  # already Bedrock's shape
            continue
        if not isinstance(function, dict) or not function.get("name"):
            raise _bad(f"tools[{i}].function.name is required")
        spec: dict[str, Any] = {"name": function["name"], "inputSchema": {
            "json": function.get("parameters") or {"type": "object", "properties": {}}}}
        if function.get("description"):
            spec["description"] = function["description"]
        specs.append({"toolSpec": spec})
    config: dict[str, Any] = {"tools": specs}
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif choice == "none":
        has_tool_blocks = any("toolUse" in b or "toolResult" in b for t in turns for b in t["content"])
        return {"tools": specs} if has_tool_blocks else None
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and choice["function"].get("name"):
        config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    else:
        raise _bad("tool_choice must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    return config


def to_converse(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request body (gateway params removed) -> a Converse request body (the model
    goes in the URL)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("messages must be an array")
    system, turns = _system_and_turns(messages)
    out: dict[str, Any] = {"messages": turns}
    if system:
        out["system"] = system
    inference: dict[str, Any] = {}
    thinking = thinking_config(body, _bad)
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = max_tokens_for(body, thinking) if given is not None or isinstance(thinking, dict) else None
    if max_tokens is not None:
        inference["maxTokens"] = max_tokens
    if body.get("temperature") is not None:
        inference["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        inference["topP"] = body["top_p"]
    stop = body.get("stop")
    if isinstance(stop, str):
        inference["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        inference["stopSequences"] = stop
    if inference:
        out["inferenceConfig"] = inference
    tool_config = _tool_config(body, turns)
    if tool_config is not None:
        out["toolConfig"] = tool_config
    extra: dict[str, Any] = {}
    if body.get("top_k") is not None:
        extra["top_k"] = body["top_k"]
    if isinstance(thinking, dict):
        extra["thinking"] = thinking
    if extra:
        out["additionalModelRequestFields"] = extra
    return out


# -- response -----------------------------------------------------------------------------


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def usage_from_converse(usage: Any) -> dict[str, Any]:
    """Converse usage -> OpenAI usage (cache read / write in prompt_tokens_details)."""
    usage = usage if isinstance(usage, dict) else {}
    return openai_usage({
        "input_tokens": usage.get("inputTokens"),
        "output_tokens": usage.get("outputTokens"),
        "cache_read_input_tokens": usage.get("cacheReadInputTokens"),
        "cache_creation_input_tokens": usage.get("cacheWriteInputTokens"),
    })


def from_converse(data: dict[str, Any], model: str = "") -> dict[str, Any]:
    """A Converse response -> an OpenAI chat.completion."""
    output = data.get("output") if isinstance(data.get("output"), dict) else {}
    message_in = output.get("message") if isinstance(output.get("message"), dict) else {}
    texts: list[str] = []
    reasoning: list[str] = []
    signed: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for block in message_in.get("content") or ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            tool_calls.append({"id": use.get("toolUseId"), "type": "function", "function": {
                "name": use.get("name"), "arguments": orjson.dumps(use.get("input") or {}).decode()}})
        elif isinstance(block.get("reasoningContent"), dict):
            text = (block["reasoningContent"].get("reasoningText") or {}).get("text")
            if isinstance(text, str):
                reasoning.append(text)
            thinking = _thinking_block(block["reasoningContent"])
            if thinking is not None:
                signed.append(thinking)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if signed:
        message["thinking_blocks"] = signed
    return {
        "id": f"chatcmpl-bedrock-{time.time_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(data.get("stopReason"))}],
        "usage": usage_from_converse(data.get("usage")),
    }


def _error_type(status: int) -> str:
    return STATUS_ERROR_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_message(status: int, raw: bytes) -> str:
    """The message of a Bedrock error body (`{"message"}`), else its text, else a generic one."""
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    message = None
    if isinstance(data, dict):
        message = data.get("message") or data.get("Message")
    if not isinstance(message, str) or not message:
        text = raw[:500].decode("utf-8", "replace").strip() if raw and data is None else ""
        message = text or f"Bedrock returned HTTP {status}"
    return message


def error_reply_body(status: int, raw: bytes, error_type: str | None) -> bytes:
    """A Bedrock error (`{"message"}` + x-amzn-errortype) -> an OpenAI-shaped error body."""
    message = error_message(status, raw)
    code = (error_type or "").split(":", 1)[0] or _error_type(status)
    if status == 400 and "too long" in message.lower():
        code = "context_length_exceeded"
    return orjson.dumps({"error": {"message": message, "type": _error_type(status), "param": None, "code": code}})


def stream_error_event(kind: str, message: str) -> bytes:
    status = STREAM_EXCEPTION_STATUS.get(kind, 502)
    error = {"message": message or kind, "type": kind, "param": None, "code": status}
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


class StreamTranslator(EventStreamReader):
    """Converse stream events in, OpenAI chat.completion.chunk SSE bytes out."""

    __slots__ = ("id", "model", "created", "opened", "stop_reason", "_tools", "_reasoning")

    def __init__(self, model: str) -> None:
        super().__init__()
        self.id = f"chatcmpl-bedrock-{time.time_ns():x}"
        self.model = model
        self.created = int(time.time())
        self.opened = False
        self.stop_reason: str | None = None
        self._tools: dict[int, int] = {}  # contentBlockIndex -> tool_calls index
        self._reasoning: dict[int, dict[str, Any]] = {}  # contentBlockIndex -> reasoningContent so far

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return chunk_event(self.id, self.created, self.model, delta, finish)

    def _delta(self, out: list[bytes], delta: dict[str, Any], finish: str | None = None) -> None:
        if not self.opened:
            self.opened = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        out.append(self._chunk(delta, finish))

    def _end(self, out: list[bytes], usage: Any) -> None:
        if not self.opened:
            self.opened = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_from_converse(usage)}
        out.append(b"data: " + orjson.dumps(data) + b"\n\ndata: [DONE]\n\n")
        self.done = True

    def _failure(self, kind: str, message: str) -> bytes:
        return stream_error_event(kind, message)

    def _event(self, out: list[bytes], event_type: Any, payload: bytes) -> None:
        event = json_object(payload) if payload else None
        if event is not None:
            self._converse_event(event_type, event, out)

    def _converse_event(self, kind: Any, event: dict[str, Any], out: list[bytes]) -> None:
        if kind == "contentBlockDelta":
            delta = event.get("delta") or {}
            index = event.get("contentBlockIndex", 0)
            if isinstance(delta.get("text"), str):
                if delta["text"]:
                    self._delta(out, {"content": delta["text"]})
            elif isinstance(delta.get("toolUse"), dict):
                piece = delta["toolUse"].get("input")
                if piece and index in self._tools:
                    self._delta(out, {"tool_calls": [{"index": self._tools[index], "function": {"arguments": piece}}]})
            elif isinstance(delta.get("reasoningContent"), dict):
                piece = delta["reasoningContent"]
                block = self._reasoning.setdefault(index, {"reasoningText": {"text": "", "signature": ""}})
                text = piece.get("text")
                if text:
                    block["reasoningText"]["text"] += text
                    self._delta(out, {"reasoning_content": text})
                if piece.get("signature"):
                    block["reasoningText"]["signature"] += piece["signature"]
                if piece.get("redactedContent"):
                    block["redactedContent"] = piece["redactedContent"]
        elif kind == "contentBlockStop":
            # a reasoning block is sent once more whole, signed, so it can go back in the next turn
            reasoning = self._reasoning.pop(event.get("contentBlockIndex", 0), None)
            thinking = _thinking_block(reasoning) if reasoning is not None else None
            if thinking is not None:
                self._delta(out, {"thinking_blocks": [thinking]})
        elif kind == "contentBlockStart":
            start = event.get("start") or {}
            use = start.get("toolUse")
            if isinstance(use, dict):
                position = self._tools[event.get("contentBlockIndex", 0)] = len(self._tools)
                self._delta(out, {"tool_calls": [{"index": position, "id": use.get("toolUseId"), "type": "function",
                                                  "function": {"name": use.get("name"), "arguments": ""}}]})
        elif kind == "messageStop":
            self.stop_reason = event.get("stopReason") or "end_turn"
            self._delta(out, {}, finish_reason(self.stop_reason))
        elif kind == "metadata":
            self._end(out, event.get("usage"))
        # messageStart and unknown events: nothing to send

    def finish(self) -> bytes:
        """The body ended: a stream that lacks only `metadata` is closed without usage numbers."""
        if self.done or self.failed or self.stop_reason is None:
            return b""
        out: list[bytes] = []
        self._end(out, None)
        return b"".join(out)

    @property
    def complete(self) -> bool:
        return self.done or self.failed or self.stop_reason is not None


# -- credentials and URLs -----------------------------------------------------------------


class AwsCredentials:
    __slots__ = ("access_key", "secret_key", "session_token", "region")

    def __init__(self, access_key: str, secret_key: str, session_token: str | None, region: str) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token
        self.region = region


def region_of(url: str) -> str | None:
    match = AWS_HOST.match(urlsplit(url).hostname or "")
    return match.group(2) if match else None


def split_key(api_key: str | None) -> tuple[str, str, str | None] | None:
    """"ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]" -> its parts; None when not that shape."""
    if not api_key:
        return None
    parts = api_key.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    return parts[0], parts[1], (parts[2] if len(parts) == 3 and parts[2] else None)


def credentials_for(target: Target, base_url: str) -> AwsCredentials | None:
    fields = target.credentials or {}
    access, secret = fields.get("aws_access_key_id"), fields.get("aws_secret_access_key")
    token = fields.get("aws_session_token")
    if not (isinstance(access, str) and access and isinstance(secret, str) and secret):
        pair = split_key(target.api_key)
        if pair is None:
            return None
        access, secret, token = pair
    region = fields.get("aws_region_name")
    if not isinstance(region, str) or not region:
        region = region_of(base_url) or DEFAULT_REGION
    return AwsCredentials(access, secret, token if isinstance(token, str) and token else None, region)


def model_path(model: str, stream: bool, action: str | None = None) -> str:
    """`/model/{modelId}/{action}`: converse / converse-stream, or another action (e.g. invoke)."""
    action = action or ("converse-stream" if stream else "converse")
    return f"/model/{quote(model, safe=PATH_SAFE)}/{action}"


# -- the adapter --------------------------------------------------------------------------


def _error(status: int, message: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": _error_type(status), "param": None, "code": code}})


def reply_headers(response: UpstreamResponse) -> dict[str, str]:
    """The usual pass-through headers, plus AWS's request id as x-request-id."""
    headers = response.pass_headers()
    request_id = response.headers.get("x-amzn-requestid")
    if request_id:
        headers.setdefault("x-request-id", request_id)
    return headers


class BedrockConverse:
    endpoints = frozenset({"chat", "anthropic.messages", "anthropic.count_tokens"})

    def __init__(self, config: Provider, timeouts: Timeouts, upstream: UpstreamClient) -> None:
        self.config = config
        self.timeouts = config.timeouts or timeouts
        self.upstream = upstream
        version = config.api_version if (config.api_version or "").startswith("bedrock-") else None
        self.anthropic_version = version or native.ANTHROPIC_VERSION

    def base_url(self, target: Target, region: str | None) -> str:
        base = (target.base_url or self.config.base_url).rstrip("/")
        if not base:
            return f"https://bedrock-runtime.{region or DEFAULT_REGION}.amazonaws.com"
        current = region_of(base)
        if region and current and current != region:  # the request's region, on AWS's own host
            base = base.replace(f".{current}.amazonaws.com", f".{region}.amazonaws.com", 1)
        return base

    def endpoint(self, target: Target) -> tuple[str, AwsCredentials | None]:
        """(base URL, keys and region) for a target; no keys: None."""
        fields = target.credentials or {}
        wanted = fields.get("aws_region_name") if isinstance(fields.get("aws_region_name"), str) else None
        base = self.base_url(target, wanted)
        return base, credentials_for(target, base)

    @staticmethod
    def no_credentials(target: Target) -> Reply:
        message = (f"provider '{target.provider}' has no AWS credentials: set its api_key to "
                   "ACCESS_KEY_ID:SECRET_ACCESS_KEY, or send aws_access_key_id and aws_secret_access_key")
        return Reply(401, body=_error(401, message, "missing_aws_credentials"))

    def signed_headers(self, target: Target, credentials: AwsCredentials, url: str, body: bytes, *,
                       stream: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"content-type": "application/json",
                   "accept": "application/vnd.amazon.eventstream" if stream else "application/json"}
        if not target.custom_credential or not target.base_url or target.base_url == self.config.base_url:
            headers.update({k.lower(): v for k, v in self.config.headers.items()})
        if target.extra_headers:
            headers.update({k.lower(): v for k, v in target.extra_headers.items()})
        if extra:
            headers.update(extra)
        return sign_headers("POST", url, headers, body, access_key=credentials.access_key,
                            secret_key=credentials.secret_key, region=credentials.region, service=SERVICE,
                            session_token=credentials.session_token)

    async def send(self, call: Call, target: Target) -> Reply:
        if call.client_format == "anthropic":
            return await self.send_native(call, target)
        body = orjson.dumps(to_converse(call.body))
        base, credentials = self.endpoint(target)
        if credentials is None:
            return self.no_credentials(target)
        url = base + model_path(target.model, call.stream)
        signed = self.signed_headers(target, credentials, url, body, stream=call.stream)
        response, raw = await post_upstream(self, call, target, url, signed, body)
        headers = reply_headers(response)
        if raw is None:
            return Reply(200, stream=self._stream(response, target), headers=headers,
                         media_type="text/event-stream")
        if response.status >= 400:
            out = error_reply_body(response.status, raw, response.headers.get("x-amzn-errortype"))
            return Reply(response.status, body=out, headers=headers)
        data = json_object(raw)
        if data is None:
            message = f"provider '{target.provider}' sent a response that is not a JSON object"
            return Reply(502, body=_error(502, message, "bad_response"), headers=headers)
        return Reply(200, body=orjson.dumps(from_converse(data, target.model)), headers=headers)

    async def send_native(self, call: Call, target: Target) -> Reply:
        """An Anthropic-format call (Messages or count_tokens) to Bedrock's Anthropic API; the
        answer in Anthropic's format (a Message's bytes unchanged)."""
        if not native.is_anthropic_model(target.model):
            raise BadRequest(f"Provider '{target.provider}' serves Anthropic-format requests for Claude models "
                             f"only, not {target.model!r}")
        base, credentials = self.endpoint(target)
        if credentials is None:
            return self.no_credentials(target)
        invoke = native.invoke_body(call, self.anthropic_version)
        counting = call.endpoint == "anthropic.count_tokens"
        stream = call.stream and not counting
        if counting:
            body = native.count_tokens_body(invoke)
            path = model_path(native.count_tokens_model(target.model), False, "count-tokens")
        else:
            body = orjson.dumps(invoke)
            path = model_path(target.model, stream, "invoke-with-response-stream" if stream else "invoke")
        url = base + path
        signed = self.signed_headers(target, credentials, url, body, stream=stream,
                                     extra=native.upstream_headers(call))
        response, raw = await post_upstream(self, call, target, url, signed, body, stream=stream)
        headers = reply_headers(response)
        if raw is None:
            return Reply(200, stream=native.relay_stream(response, target.provider), headers=headers,
                         media_type="text/event-stream")
        if response.status >= 400:
            out = native.error_body(response.status, error_message(response.status, raw),
                                    response.headers.get("x-amzn-errortype"))
            return Reply(response.status, body=out, headers=headers)
        if counting:
            answer = native.count_tokens_answer(raw)
            if answer is None:
                message = f"provider '{target.provider}' sent a CountTokens answer without inputTokens"
                return Reply(502, body=native.error_body(502, message, None), headers=headers)
            return Reply(200, body=answer, headers=headers)
        return Reply(response.status, body=raw, headers=headers)

    async def _stream(self, response: UpstreamResponse, target: Target) -> AsyncIterator[bytes]:
        translator = StreamTranslator(target.model)
        async with contextlib.aclosing(read_event_stream(response, translator, target.provider)) as reads:
            async for out in reads:
                yield out
        out = translator.finish()
        if out:
            yield out
        if not translator.complete:
            raise UpstreamStreamError(f"provider '{target.provider}' ended the stream before the message was complete")

    async def close(self) -> None:
        return None
