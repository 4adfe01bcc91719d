"""Anthropic Messages API (`POST /v1/messages`) behind the unified router.

The client speaks OpenAI chat; this module translates the request to a Messages request and the
answer (whole or streamed) back to a chat.completion / chat.completion.chunk. The choices, as the
README documents them:

Request
- `system` and `developer` messages, wherever they are, go to the top-level `system` (in order).
  A single plain text stays a string; otherwise a list of text blocks, keeping `cache_control`.
- `user`, `assistant` and `tool` messages become Messages turns; `tool` messages are `tool_result`
  blocks in a user turn; consecutive turns of one role are merged (tool results first), and a turn
  that is one plain text block is sent as a string.
- Content parts: `text` (with `cache_control`), `image_url` (http(s) URL -> a `url` source, data
  URL -> a `base64` source with its media type), `file` with `file_data` (a data URL -> a
  `document` block), and Anthropic's own `image` / `document` / `thinking` / `redacted_thinking`
  blocks pass as they are. A `cache_control` on a whole message goes to its last block. Anything
  else (`input_audio`, `file_id`) is a 400: Anthropic cannot take it.
- Assistant `tool_calls` -> `tool_use` blocks (`arguments` must be a JSON object; "" means {});
  assistant `thinking_blocks` (as this module returns them) go back first in the turn, so a
  multi-turn conversation with thinking and tools keeps its signatures. A bare
  `reasoning_content` cannot be sent back (it has no signature) and is dropped.
- `tools` (function tools -> name / description / input_schema; a tool without `function`, e.g.
  Anthropic's server tools, passes as it is), `tool_choice` (auto / none / required -> any /
  {function:{name}} -> tool), `parallel_tool_calls: false` -> `disable_parallel_tool_use`.
- `thinking` passes through. Without it, `reasoning_effort` maps to an enabled thinking budget:
  minimal/low 1024, medium 4096, high 16384 tokens ("none": no thinking).
- `max_completion_tokens` (else `max_tokens`) -> `max_tokens`, default 4096. When thinking is
  on and the client gave no limit, the default is raised to budget + 4096 (Anthropic wants
  max_tokens > budget_tokens).
- `stop` (str or list) -> `stop_sequences`; `temperature`, `top_p`, `top_k` as given; `user` ->
  `metadata.user_id`; `response_format` json_schema -> `output_config.format`.
- Headers: `x-api-key` and `anthropic-version` (the provider's `api_version`, default 2023-06-01).
  API version 2026-10-21 removed `temperature`, `top_p` and `top_k` (a 400 even at their
  defaults): with a configured `api_version` of 2026-10-21 or later they are dropped, and the
  log says so in its warnings.
- Dropped (no Anthropic equivalent): n, frequency_penalty, presence_penalty, logit_bias,
  logprobs, top_logprobs, seed, response_format text/json_object, stream_options (usage is
  always streamed), service_tier, store, modalities, audio, prediction, verbosity,
  web_search_options, functions / function_call (legacy), and any other unknown field.

Response
- Text blocks are joined into `message.content`; `tool_use` -> `message.tool_calls` (arguments as
  a JSON string); thinking text -> `message.reasoning_content`, and the thinking blocks with their
  signatures (and redacted ones) -> `message.thinking_blocks`.
- stop_reason -> finish_reason: end_turn / stop_sequence / pause_turn -> stop, max_tokens and
  model_context_window_exceeded -> length, tool_use -> tool_calls, refusal -> content_filter.
- usage: prompt_tokens = input + cache creation + cache read tokens; completion_tokens = output
  tokens; prompt_tokens_details {cached_tokens, cache_creation_tokens}, plus Anthropic's
  `cache_creation_input_tokens` / `cache_read_input_tokens` at the top of usage (spec 2.1.2).
- A stream: a role chunk (sent with the first content, so an error right after message_start can
  still fall back), content / reasoning_content / tool_calls deltas, a finish_reason chunk, a
  usage chunk (always; the core hides it from a client that did not ask) and [DONE]. A finished
  thinking block is sent once more whole, with its signature, as `delta.thinking_blocks`.
- Errors: Anthropic's `{"type":"error","error":{type,message}}` -> OpenAI's
  `{"error":{message,type,param:null,code:<anthropic type>}}` with the status of the type (a 400
  "prompt is too long" gets code `context_length_exceeded`, as OpenAI names it);
  `overloaded_error` (HTTP 529, not a standard status) becomes 503 so clients, retries, fallbacks
  and cooldowns treat it as the "temporarily unavailable" it is. An `error` event inside a
  stream ends the stream with `data: {"error":{message,type,code:<status>}}` (no [DONE]). A
  stream that fails after content went out (error event, broken or truncated body) first sends
  the usage known so far: the input tokens of message_start and at least one output token per
  delta sent. Before any content nothing else is sent, so the fallback stage sees the error
  as the stream's first event and can try the next candidate.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson

from proxy.call import Call, Reply, Target
from proxy.errors import BadRequest
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
from proxy.settings import Provider, Timeouts
from proxy.sse import SSEDecoder
from proxy.sse_anthropic import ERROR_STATUS as ANTHROPIC_ERROR_STATUS
from proxy.upstream import UpstreamClient, UpstreamResponse, UpstreamStreamError

ANTHROPIC_VERSION = "2023-06-01"
NO_SAMPLING_SINCE = "2026-10-21"  # the API version that removed temperature, top_p and top_k
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")
DEFAULT_MAX_TOKENS = 4096
EFFORT_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type -> the status the client gets: Anthropic's own, except 529 (not a
# standard status), which the client sees as 503 so retries and cooldowns treat it as a 5xx
ERROR_STATUS = ANTHROPIC_ERROR_STATUS | {"overloaded_error": 503}
STATUS_ERROR_TYPE = {status: kind for kind, status in ERROR_STATUS.items()} | {529: "overloaded_error"}
NONSTANDARD_STATUS = {529: 503}

DROPPED_FIELDS = frozenset({
    "n", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "seed",
    "stream_options", "service_tier", "store", "modalities", "audio", "prediction", "verbosity",
    "web_search_options", "functions", "function_call",
})  # for the documentation and tests: the request builder reads only the fields it maps

NATIVE_BLOCKS = frozenset({"image", "document", "thinking", "redacted_thinking"})


# -- request ------------------------------------------------------------------------------


def _bad(message: str) -> BadRequest:
    return BadRequest(f"Invalid request for an Anthropic model: {message}")


def _data_url(url: str, where: str) -> tuple[str, str]:
    """(media_type, base64 data) of a `data:<type>;base64,<data>` URL."""
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise _bad(f"{where}: a data URL must be base64 (data:<media type>;base64,<data>)")
    media_type = head[5:-7].split(";", 1)[0]
    if not media_type:
        raise _bad(f"{where}: the data URL has no media type")
    return media_type, data


def _image(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = image_url(part, where, _bad)
    if url.startswith("data:"):
        media_type, data = _data_url(url, where)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad(f"{where}: image_url.url must be an http(s) URL or a data URL")


def _file(part: dict[str, Any], where: str) -> dict[str, Any]:
    _, data = file_data(part, where, _bad)
    media_type, payload = _data_url(data, where)
    return {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": payload}}


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI message content (a string or a list of parts) -> Anthropic content blocks."""
    out: list[dict[str, Any]] = []
    for _, at, part in content_parts(content, where, _bad):
        kind = part.get("type")
        if kind == "text":
            if not part["text"]:
                continue  # Anthropic refuses empty text blocks
            block: dict[str, Any] = {"type": "text", "text": part["text"]}
        elif kind == "image_url":
            block = _image(part, at)
        elif kind == "file":
            block = _file(part, at)
        elif kind in NATIVE_BLOCKS:
            out.append(part)
            continue
        else:
            raise _bad(f"{at}: content parts of type {kind!r} are not supported by Anthropic")
        if part.get("cache_control"):
            block["cache_control"] = part["cache_control"]
        out.append(block)
    return out


def _mark_last(blocks: list[dict[str, Any]], cache_control: Any) -> None:
    """A message-level cache_control: the cache breakpoint goes on the message's last block."""
    if cache_control and blocks and "cache_control" not in blocks[-1]:
        blocks[-1] = {**blocks[-1], "cache_control": cache_control}


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function, name = tool_function(call, where, _bad)
    arguments = tool_arguments(function, where, _bad)
    return {"type": "tool_use", "id": tool_call_id(call, where, _bad), "name": name, "input": arguments}


def thinking_blocks(blocks: Any) -> list[dict[str, Any]]:
    out = []
    for block in blocks if isinstance(blocks, list) else ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "thinking" and block.get("signature"):
            out.append({"type": "thinking", "thinking": block.get("thinking") or "", "signature": block["signature"]})
        elif block.get("type") == "redacted_thinking" and block.get("data"):
            out.append({"type": "redacted_thinking", "data": block["data"]})
    return out


def _system_and_turns(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []  # {"role", "content": [blocks]}, merged per role
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            blocks = _blocks(message.get("content"), where)
            for block in blocks:
                if block.get("type") != "text":
                    raise _bad(f"{where}: a system message may hold text only")
            _mark_last(blocks, message.get("cache_control"))
            system.extend(blocks)
            continue
        if role == "user":
            blocks = _blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = thinking_blocks(message.get("thinking_blocks"))
            blocks += _blocks(message.get("content"), where)
            tool_calls = message.get("tool_calls") or []
            if not isinstance(tool_calls, list):
                raise _bad(f"{where}.tool_calls must be an array")
            blocks += [_tool_use(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(tool_calls)]
        elif role == "tool":
            tool_call_id = message.get("tool_call_id")
            if not isinstance(tool_call_id, str) or not tool_call_id:
                raise _bad(f"{where}.tool_call_id is required on a tool message")
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_call_id}
            content = message.get("content")
            if isinstance(content, str):
                if content:
                    result["content"] = content
            else:
                inner = _blocks(content, where)
                if inner:
                    result["content"] = inner
            blocks = [result]
            role = "user"
        else:
            raise _bad(f"{where}.role {role!r} is not supported (system, developer, user, assistant, tool)")
        _mark_last(blocks, message.get("cache_control"))
        if not blocks:
            continue  # e.g. an assistant message with neither content nor tool calls
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        content = turn["content"]
        if turn["role"] == "user" and any(b.get("type") == "tool_result" for b in content):
            # Anthropic wants a turn's tool results before anything else in it
            content.sort(key=lambda b: b.get("type") != "tool_result")
        if len(content) == 1 and set(content[0]) == {"type", "text"}:
            turn["content"] = content[0]["text"]
    return system, turns


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools must be an array")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _bad(f"tools[{i}] must be an object")
        function = tool.get("function")
        if function is None:
            out.append(tool)  # an Anthropic tool as it is (e.g. a server tool)
            continue
        if not isinstance(function, dict) or not function.get("name"):
            raise _bad(f"tools[{i}].function.name is required")
        converted: dict[str, Any] = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            converted["description"] = function["description"]
        cache_control = tool.get("cache_control") or function.get("cache_control")
        if cache_control:
            converted["cache_control"] = cache_control
        out.append(converted)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        result: dict[str, Any] | None = None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "none":
        result = {"type": "none"}
    elif choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and choice["function"].get("name"):
        result = {"type": "tool", "name": choice["function"]["name"]}
    elif isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool", "none"):
        result = dict(choice)  # already Anthropic's shape
    else:
        raise _bad("tool_choice must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    if parallel is False and (result is None or result["type"] != "none"):
        result = {**(result or {"type": "auto"}), "disable_parallel_tool_use": True}
    return result


def thinking_config(body: dict[str, Any], bad: Callable[[str], BadRequest]) -> Any:
    """Claude's `thinking`: the client's own, else one from `reasoning_effort` (None: no thinking)."""
    thinking = body.get("thinking")
    effort = body.get("reasoning_effort")
    if thinking is None and effort is not None and effort != "none":
        budget = EFFORT_BUDGETS.get(effort) if isinstance(effort, str) else None
        if budget is None:
            raise bad(f"reasoning_effort must be one of none, {', '.join(EFFORT_BUDGETS)}")
        thinking = {"type": "enabled", "budget_tokens": budget}
    return thinking


def max_tokens_for(body: dict[str, Any], thinking: Any) -> Any:
    """max_completion_tokens, else max_tokens, else the default (raised above a thinking budget)."""
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if isinstance(budget, int) and budget >= max_tokens:
            max_tokens = budget + DEFAULT_MAX_TOKENS
    return max_tokens


def to_anthropic(body: dict[str, Any], model: str, *, stream: bool = False, sampling: bool = True) -> dict[str, Any]:
    """An OpenAI chat request body (gateway params already removed) -> a Messages request body.

    `sampling` False: leave out temperature / top_p / top_k (API versions that removed them)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("messages must be an array")
    system, turns = _system_and_turns(messages)
    out: dict[str, Any] = {"model": model}
    if system:
        if len(system) == 1 and set(system[0]) == {"type", "text"}:
            out["system"] = system[0]["text"]
        else:
            out["system"] = system
    out["messages"] = turns

    thinking = thinking_config(body, _bad)
    out["max_tokens"] = max_tokens_for(body, thinking)
    if thinking is not None:
        out["thinking"] = thinking

    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    if sampling:
        for key in SAMPLING_PARAMS:
            if body.get(key) is not None:
                out[key] = body[key]

    tools = body.get("tools")
    if tools:
        out["tools"] = _tools(tools)
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice

    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            out["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    if stream:
        out["stream"] = True
    return out


# -- response -----------------------------------------------------------------------------


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and value > 0 else 0


def openai_usage(usage: Any) -> dict[str, Any]:
    """Anthropic usage -> OpenAI usage with the cache counters of spec 2.1.2."""
    usage = usage if isinstance(usage, dict) else {}
    cache_creation = _count(usage, "cache_creation_input_tokens")
    cache_read = _count(usage, "cache_read_input_tokens")
    prompt = _count(usage, "input_tokens") + cache_creation + cache_read
    completion = _count(usage, "output_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_creation_tokens": cache_creation},
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
    }


def finish_reason(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def from_anthropic(data: dict[str, Any], model: str = "") -> dict[str, Any]:
    """A Messages response -> an OpenAI chat.completion."""
    texts: list[str] = []
    reasoning: list[str] = []
    thinking_blocks: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for block in data.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            tool_calls.append({
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()},
            })
        elif kind == "thinking":
            reasoning.append(block.get("thinking") or "")
            thinking_blocks.append({"type": "thinking", "thinking": block.get("thinking") or "",
                                    "signature": block.get("signature")})
        elif kind == "redacted_thinking":
            thinking_blocks.append({"type": "redacted_thinking", "data": block.get("data")})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if thinking_blocks:
        message["reasoning_content"] = "".join(reasoning)
        message["thinking_blocks"] = thinking_blocks
    return {
        "id": data.get("id") or f"chatcmpl-{int(time.time() * 1000)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model") or model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(data.get("stop_reason"))}],
        "usage": openai_usage(data.get("usage")),
    }


def error_reply_body(status: int, raw: bytes) -> tuple[int, bytes]:
    """An Anthropic error response -> (status for the client, OpenAI-shaped error body)."""
    kind: Any = None
    message: Any = None
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
    # the status follows Anthropic's error type when the body names one, else the upstream status
    out_status = ERROR_STATUS.get(kind) if isinstance(kind, str) else None
    out_status = out_status or NONSTANDARD_STATUS.get(status, status)
    if not isinstance(kind, str) or not kind:
        kind = STATUS_ERROR_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")
    if not isinstance(message, str) or not message:
        text = raw[:500].decode("utf-8", "replace").strip() if raw and data is None else ""
        message = text or f"Anthropic returned HTTP {status}"
    code = "context_length_exceeded" if out_status == 400 and "prompt is too long" in message.lower() else kind
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return out_status, orjson.dumps(body)


def stream_error_event(error: Any) -> bytes:
    """An `error` event inside an Anthropic stream -> the OpenAI-shaped event that ends the stream."""
    error = error if isinstance(error, dict) else {}
    kind = error.get("type") if isinstance(error.get("type"), str) else "api_error"
    message = error.get("message") if isinstance(error.get("message"), str) else kind
    status = ERROR_STATUS.get(kind, 502)
    return b"data: " + orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}) + b"\n\n"


class StreamTranslator:
    """Anthropic stream events in, OpenAI chat.completion.chunk SSE bytes out."""

    __slots__ = ("id", "model", "created", "usage", "opened", "deltas", "stop_reason", "done", "failed",
                 "_tools", "_thinking")

    def __init__(self, model: str) -> None:
        self.id = "chatcmpl-anthropic"
        self.model = model
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.opened = False  # the role chunk went out
        self.deltas = 0  # content deltas sent
        self.stop_reason: str | None = None
        self.done = False  # message_stop seen: usage and [DONE] went out
        self.failed = False  # an error event went out
        self._tools: dict[int, int] = {}  # content block index -> tool_calls index
        self._thinking: dict[int, dict[str, Any]] = {}  # block index -> the thinking block so far

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return chunk_event(self.id, self.created, self.model, delta, finish)

    def _delta(self, out: list[bytes], delta: dict[str, Any], finish: str | None = None) -> None:
        if not self.opened:
            self.opened = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if delta and "thinking_blocks" not in delta:
            self.deltas += 1
        out.append(self._chunk(delta, finish))

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for key, value in usage.items():
                if isinstance(value, int):
                    self.usage[key] = value

    def feed(self, events: Iterable[tuple[str | None, bytes]]) -> bytes:
        out: list[bytes] = []
        for name, data in events:
            if self.done or self.failed:
                break
            try:
                event = orjson.loads(data) if data else None
            except orjson.JSONDecodeError:
                continue  # not an event we can read; Anthropic sends none such
            if not isinstance(event, dict):
                continue
            self._event(event.get("type") or name, event, out)
        return b"".join(out)

    def _event(self, kind: Any, event: dict[str, Any], out: list[bytes]) -> None:
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            index = event.get("index", 0)
            dtype = delta.get("type")
            if dtype == "text_delta":
                if delta.get("text"):
                    self._delta(out, {"content": delta["text"]})
            elif dtype == "input_json_delta":
                if delta.get("partial_json") and index in self._tools:
                    self._delta(out, {"tool_calls": [
                        {"index": self._tools[index], "function": {"arguments": delta["partial_json"]}}]})
            elif dtype == "thinking_delta":
                text = delta.get("thinking") or ""
                if index in self._thinking:
                    self._thinking[index]["thinking"] += text
                if text:
                    self._delta(out, {"reasoning_content": text})
            elif dtype == "signature_delta" and index in self._thinking:
                self._thinking[index]["signature"] += delta.get("signature") or ""
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            index = event.get("index", 0)
            btype = block.get("type")
            if btype == "tool_use":
                position = self._tools[index] = len(self._tools)
                self._delta(out, {"tool_calls": [{"index": position, "id": block.get("id"), "type": "function",
                                                  "function": {"name": block.get("name"), "arguments": ""}}]})
            elif btype == "text":
                if block.get("text"):
                    self._delta(out, {"content": block["text"]})
            elif btype == "thinking":
                self._thinking[index] = {"type": "thinking", "thinking": block.get("thinking") or "",
                                         "signature": block.get("signature") or ""}
                if block.get("thinking"):
                    self._delta(out, {"reasoning_content": block["thinking"]})
            elif btype == "redacted_thinking":
                self._thinking[index] = {"type": "redacted_thinking", "data": block.get("data")}
        elif kind == "content_block_stop":
            block = self._thinking.pop(event.get("index", 0), None)
            if block is not None:
                self._delta(out, {"thinking_blocks": [block]})
        elif kind == "message_start":
            message = event.get("message") or {}
            if message.get("id"):
                self.id = message["id"]
            if message.get("model"):
                self.model = message["model"]
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            self._usage(event.get("usage"))
            stop = (event.get("delta") or {}).get("stop_reason")
            if stop:
                self.stop_reason = stop
                self._delta(out, {}, finish_reason(stop))
        elif kind == "message_stop":
            self._end(out)
        elif kind == "error":
            self.failed = True
            out.append(self.partial_usage())
            out.append(stream_error_event(event.get("error")))
        # ping and unknown events: nothing to send

    def _usage_chunk(self, usage: dict[str, Any]) -> bytes:
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": openai_usage(usage)}
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def partial_usage(self) -> bytes:
        """Usage as far as it is known when a stream fails after content went out: the input tokens
        of message_start, and at least one output token per delta sent (Anthropic counts the
        output only at message_delta). Before any content, nothing: the first event the fallback
        stage peeks at must be the error itself."""
        if not self.opened or not self.usage:
            return b""
        return self._usage_chunk({**self.usage, "output_tokens": max(self.usage.get("output_tokens", 0), self.deltas)})

    def _end(self, out: list[bytes]) -> None:
        if not self.opened:
            self.opened = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        out.append(self._usage_chunk(self.usage) + b"data: [DONE]\n\n")
        self.done = True

    def finish(self) -> bytes:
        """The upstream body ended. A stream that lacks only message_stop is closed as complete;
        for one that ended before its stop_reason, `complete` is False and the caller raises."""
        if self.done or self.failed or self.stop_reason is None:
            return b""
        out: list[bytes] = []
        self._end(out)
        return b"".join(out)

    @property
    def complete(self) -> bool:
        return self.done or self.failed or self.stop_reason is not None


# -- the adapter --------------------------------------------------------------------------


def reply_headers(response: UpstreamResponse) -> dict[str, str]:
    """The usual pass-through headers, plus Anthropic's request id and rate-limit state."""
    headers = response.pass_headers()
    for name, value in response.headers.items():
        lower = name.lower()
        if lower == "request-id":
            headers.setdefault("x-request-id", value)
        elif lower.startswith("anthropic-ratelimit-"):
            headers[lower] = value
    return headers


NATIVE_ENDPOINTS = frozenset({"chat", "anthropic.messages", "anthropic.count_tokens"})
CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")  # a native client's own headers, kept


def native_error_body(status: int, raw: bytes) -> bytes:
    """An upstream error for a native Anthropic client: Anthropic's own error body as it is, or
    (a body of another shape) one in Anthropic's format."""
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and data.get("type") == "error" and isinstance(data.get("error"), dict):
        return raw
    kind = STATUS_ERROR_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = raw[:500].decode("utf-8", "replace").strip() or f"upstream returned HTTP {status}"
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


class AnthropicMessages:
    endpoints = NATIVE_ENDPOINTS
    native_version_header = True  # Vertex AI takes the version in the body instead

    def __init__(self, config: Provider, timeouts: Timeouts, upstream: UpstreamClient) -> None:
        self.config = config
        self.timeouts = config.timeouts or timeouts
        self.upstream = upstream
        self.static_headers = {
            "content-type": "application/json",
            "anthropic-version": config.api_version or ANTHROPIC_VERSION,
            **config.headers,
        }
        self._headers_by_key: dict[str | None, dict[str, str]] = {}  # treated as read-only
        self.sampling = self.static_headers["anthropic-version"] < NO_SAMPLING_SINCE

    def url(self, target: Target, stream: bool = False) -> str:
        """The Messages URL (`stream` is for subclasses whose URL differs per mode, e.g. Vertex AI)."""
        base = (target.base_url or self.config.base_url).rstrip("/")
        return base + "/messages" if base.endswith("/v1") else base + "/v1/messages"

    def request_headers(self, target: Target) -> dict[str, str]:
        if target.custom_credential:
            # never send the provider's configured headers to a base URL the client chose
            own_url = not target.base_url or target.base_url == self.config.base_url
            headers = dict(self.static_headers) if own_url else {
                "content-type": "application/json",
                "anthropic-version": self.static_headers["anthropic-version"],
            }
        else:
            if not target.extra_headers:
                cached = self._headers_by_key.get(target.api_key)
                if cached is not None:
                    return cached
            headers = dict(self.static_headers)
        if target.api_key:
            headers["x-api-key"] = target.api_key
        if target.extra_headers:
            headers.update(target.extra_headers)
        elif not target.custom_credential and len(self._headers_by_key) < 1000:
            self._headers_by_key[target.api_key] = headers
        return headers

    def request_body(self, call: Call, target: Target) -> dict[str, Any]:
        """The Messages request body (a hook: Vertex AI moves the model to the URL)."""
        return to_anthropic(call.body, target.model, stream=call.stream, sampling=self.sampling)

    # -- the native passthrough (client_format "anthropic") ---------------------------------

    def native_url(self, call: Call, target: Target) -> str:
        url = self.url(target, call.stream)
        return url + "/count_tokens" if call.endpoint == "anthropic.count_tokens" else url

    def native_body(self, call: Call, target: Target) -> dict[str, Any]:
        """The client's body as it is, with the target's upstream model (metadata already cleaned)."""
        return {**call.body, "model": target.model}

    def native_headers(self, call: Call, target: Target) -> dict[str, str]:
        headers = dict(self.request_headers(target))
        for name in CLIENT_HEADERS:
            value = call.headers.get(name)
            if value and (name != "anthropic-version" or self.native_version_header):
                headers[name] = value
        extra = call.params.extra_headers
        if extra:
            headers.update(extra)
        return headers

    async def send_native(self, call: Call, target: Target) -> Reply:
        """Forward the Anthropic request as it is; the answer's bytes come back unchanged."""
        body = orjson.dumps(self.native_body(call, target))
        stream = call.stream and call.endpoint == "anthropic.messages"
        response, raw = await post_upstream(self, call, target, self.native_url(call, target),
                                            self.native_headers(call, target), body, stream=stream)
        headers = reply_headers(response)
        if raw is None:
            return Reply(200, stream=self._native_stream(response), headers=headers, media_type="text/event-stream")
        if response.status >= 400:
            return Reply(response.status, body=native_error_body(response.status, raw), headers=headers)
        return Reply(response.status, body=raw, headers=headers)

    @staticmethod
    async def _native_stream(response: UpstreamResponse) -> AsyncIterator[bytes]:
        chunks = response.chunks()
        try:
            async for data in chunks:
                yield data
        finally:
            await chunks.aclose()

    async def send(self, call: Call, target: Target) -> Reply:
        if call.client_format == "anthropic":
            return await self.send_native(call, target)
        body = orjson.dumps(self.request_body(call, target))
        if not self.sampling and any(call.body.get(k) is not None for k in SAMPLING_PARAMS):
            warning = (f"temperature, top_p and top_k are not sent: anthropic-version "
                       f"{self.static_headers['anthropic-version']} does not accept them")
            if warning not in call.warnings:  # once, however many attempts
                call.warnings.append(warning)
        response, raw = await post_upstream(self, call, target, self.url(target, call.stream),
                                            self.request_headers(target), body)
        headers = reply_headers(response)
        if raw is None:
            return Reply(200, stream=self._stream(response, target), headers=headers, media_type="text/event-stream")
        if response.status >= 400:
            status, out = error_reply_body(response.status, raw)
            return Reply(status, body=out, headers=headers)
        data = json_object(raw)
        if data is None:
            message = f"provider '{target.provider}' sent a response that is not a JSON object"
            error = {"error": {"message": message, "type": "api_error", "param": None, "code": "bad_response"}}
            return Reply(502, body=orjson.dumps(error), headers=headers)
        return Reply(response.status, body=orjson.dumps(from_anthropic(data, target.model)), headers=headers)

    async def _stream(self, response: UpstreamResponse, target: Target) -> AsyncIterator[bytes]:
        """The translated stream. Closing it closes the upstream response at once; a stream that
        breaks, or ends before its stop_reason, raises UpstreamStreamError after the usage known
        so far (see StreamTranslator.partial_usage)."""
        decoder = SSEDecoder()
        translator = StreamTranslator(target.model)
        chunks = response.chunks()
        broken: UpstreamStreamError | None = None
        try:
            try:
                async for data in chunks:
                    out = translator.feed(decoder.feed(data))
                    if out:
                        yield out
                    if translator.failed:
                        return  # an error event ended it; the finally closes the upstream response
                out = translator.feed(decoder.flush()) + translator.finish()
            except UpstreamStreamError as exc:
                out, broken = b"", exc
            if translator.complete:
                if out:
                    yield out
                return
            partial = translator.partial_usage()
            if out or partial:
                yield out + partial
            raise broken or UpstreamStreamError(
                f"provider '{target.provider}' ended the stream before the message was complete")
        finally:
            await chunks.aclose()

    async def close(self) -> None:
        return None
