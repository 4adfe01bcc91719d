"""Turn a cached answer into the other delivery mode: a whole JSON body into the SSE stream the
client's SDK expects, or a complete SSE stream back into the whole body.

The cache stores an answer exactly as the gateway relayed it, in the client's wire format; a later
identical request may ask for the other mode. Both functions are pure. They return None when the
(client_format, endpoint) pair has no replay or the input is not a complete, successful answer (an
error event, a missing terminator, malformed JSON): the cache then treats the lookup as a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from proxy.sse import DONE, SSEDecoder

Event = tuple[str | None, Any]  # (SSE event name, the parsed data; DONE for `data: [DONE]`)


def _events(stream: bytes) -> list[Event] | None:
    """Every event of a complete stream, its data parsed; None if any data is not JSON."""
    if b"\r" in stream:  # CR alone ends a line too; JSON escapes it inside strings, so no payload holds one
        stream = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    decoder = SSEDecoder()
    try:
        return [(name, DONE if data == DONE else orjson.loads(data))
                for name, data in decoder.feed(stream) + decoder.flush() if data]
    except orjson.JSONDecodeError:
        return None


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and not data.get("error") else None


def _sse(data: Any, name: str | None = None) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


# -- OpenAI Chat Completions ----------------------------------------------------------------------

_CHAT_HEAD = ("id", "created", "model", "system_fingerprint", "service_tier")
_CHAT_TEXTS = ("content", "reasoning_content", "refusal")


def _chat_choice(slot: dict[str, Any], choice: dict[str, Any]) -> None:
    """Fold one streamed choice into its slot: text pieces, tool calls, logprobs, finish_reason."""
    delta = choice.get("delta") or {}
    for key in _CHAT_TEXTS:
        if isinstance(delta.get(key), str):
            slot.setdefault(key, []).append(delta[key])
    for call in delta.get("tool_calls") or ():
        tools = slot.setdefault("tool_calls", {})
        tool = tools.setdefault(call.get("index", len(tools)),
                                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        tool["id"] = call.get("id") or tool["id"]
        for key in ("name", "arguments"):
            tool["function"][key] += (call.get("function") or {}).get(key) or ""
    if isinstance(choice.get("logprobs"), dict):
        logprobs = slot.setdefault("logprobs", {})
        for key, value in choice["logprobs"].items():
            logprobs[key] = (logprobs.get(key) or []) + value if isinstance(value, list) else value
    if choice.get("finish_reason"):
        slot["finish_reason"] = choice["finish_reason"]


def _chat_whole(stream: bytes) -> dict[str, Any] | None:
    events = _events(stream)
    if events is None:
        return None
    head: dict[str, Any] = {}
    usage = None
    slots: dict[int, dict[str, Any]] = {}
    for _, chunk in events:
        if chunk is DONE:
            continue
        if not isinstance(chunk, dict) or chunk.get("error"):
            return None
        for key in _CHAT_HEAD:  # Azure's first chunk has an empty id and model: take the first real one
            if chunk.get(key) and key not in head:
                head[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            _chat_choice(slots.setdefault(choice.get("index", 0), {}), choice)
    if not slots or not all("finish_reason" in slot for slot in slots.values()):
        return None
    choices = []
    for index in sorted(slots):
        slot = slots[index]
        message = {"role": "assistant", "content": "".join(slot["content"]) if "content" in slot else None}
        for key in _CHAT_TEXTS[1:]:
            if text := "".join(slot.get(key, ())):
                message[key] = text
        if tools := slot.get("tool_calls"):
            message["tool_calls"] = [tools[k] for k in sorted(tools)]
        choices.append({"index": index, "message": message, "finish_reason": slot["finish_reason"],
                        "logprobs": slot.get("logprobs")})
    whole = {"id": head.get("id"), "object": "chat.completion", **head, "choices": choices}
    return whole if usage is None else {**whole, "usage": usage}


def _chat_stream(body: dict[str, Any]) -> bytes | None:
    choices = body.get("choices")
    if not choices or not all(isinstance(c, dict) and isinstance(c.get("message"), dict) and c.get("finish_reason")
                              for c in choices):
        return None
    base = {"id": body.get("id"), "object": "chat.completion.chunk", "created": body.get("created"),
            "model": body.get("model"), **{k: body[k] for k in _CHAT_HEAD[3:] if body.get(k) is not None}}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    out: list[bytes] = []
    for position, choice in enumerate(choices):
        index, message = choice.get("index", position), choice["message"]
        content = message.get("content")
        # An empty-string role delta is how OpenAI starts a text answer; a tool-only answer has null
        out.append(chunk(index, {"role": "assistant", "content": "" if isinstance(content, str) else None}))
        for key in _CHAT_TEXTS:
            if isinstance(message.get(key), str) and message[key]:
                out.append(chunk(index, {key: message[key]}))
        for k, call in enumerate(message.get("tool_calls") or ()):
            out.append(chunk(index, {"tool_calls": [{"index": k, **call}]}))
        out.append(chunk(index, {}, choice["finish_reason"], choice.get("logprobs")))
    if body.get("usage") is not None:
        out.append(_sse({**base, "choices": [], "usage": body["usage"]}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


# -- Anthropic Messages ---------------------------------------------------------------------------


def _anthropic_whole(stream: bytes) -> dict[str, Any] | None:
    events = _events(stream)
    if events is None:
        return None
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    json_parts: dict[int, list[str]] = {}
    stopped = False
    for name, event in events:
        if not isinstance(event, dict):
            return None
        kind = event.get("type") or name
        if kind == "message_start" and isinstance(event.get("message"), dict):
            message = {**event["message"], "usage": dict(event["message"].get("usage") or {})}
        elif kind == "content_block_start":
            blocks[event.get("index", 0)] = dict(event.get("content_block") or {})
        elif kind == "content_block_delta":
            index, delta = event.get("index", 0), event.get("delta") or {}
            block = blocks.get(index)
            if block is None:
                return None
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = block.get("text", "") + delta.get("text", "")
            elif dtype == "input_json_delta":
                json_parts.setdefault(index, []).append(delta.get("partial_json") or "")
            elif dtype == "thinking_delta":
                block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            elif dtype == "signature_delta":
                block["signature"] = delta.get("signature", "")
            elif dtype == "citations_delta":
                block["citations"] = [*(block.get("citations") or ()), delta.get("citation")]
        elif kind == "message_delta" and message is not None:
            message.update(event.get("delta") or {})
            message["usage"].update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
        elif kind == "message_stop":
            stopped = True
        elif kind == "error":
            return None
    if message is None or not stopped:
        return None
    for index, parts in json_parts.items():
        raw = "".join(parts)
        try:
            blocks[index]["input"] = orjson.loads(raw) if raw else blocks[index].get("input", {})
        except orjson.JSONDecodeError:
            return None
    message["content"] = [blocks[i] for i in sorted(blocks)]
    return message


def _anthropic_stream(body: dict[str, Any]) -> bytes | None:
    content = body.get("content")
    if body.get("type") != "message" or not isinstance(content, list) or not body.get("stop_reason"):
        return None
    usage = body.get("usage") or {}
    start = {**body, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}
    out = [_sse({"type": "message_start", "message": start}, "message_start")]

    def delta(index: int, data: dict[str, Any]) -> None:
        out.append(_sse({"type": "content_block_delta", "index": index, "delta": data}, "content_block_delta"))

    for index, block in enumerate(content):
        kind = block.get("type")
        if kind == "text":
            first = {**block, "text": ""}
            if block.get("citations"):
                first["citations"] = []
        elif kind == "thinking":
            first = {**block, "thinking": "", "signature": ""}
        elif "input" in block:  # tool_use, server_tool_use, mcp_tool_use
            first = {**block, "input": {}}
        else:  # redacted_thinking, tool results: they come whole in their start event
            first = block
        out.append(_sse({"type": "content_block_start", "index": index, "content_block": first}, "content_block_start"))
        if kind == "text":
            for citation in block.get("citations") or ():
                delta(index, {"type": "citations_delta", "citation": citation})
            if block.get("text"):
                delta(index, {"type": "text_delta", "text": block["text"]})
        elif kind == "thinking":
            delta(index, {"type": "thinking_delta", "thinking": block.get("thinking", "")})
            delta(index, {"type": "signature_delta", "signature": block.get("signature", "")})
        elif first is not block:
            delta(index, {"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()})
        out.append(_sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
    out.append(_sse({"type": "message_delta", "delta": {"stop_reason": body["stop_reason"],
                                                        "stop_sequence": body.get("stop_sequence")},
                     "usage": {"output_tokens": usage.get("output_tokens", 0)}}, "message_delta"))
    out.append(_sse({"type": "message_stop"}, "message_stop"))
    return b"".join(out)


# -- OpenAI Responses -----------------------------------------------------------------------------


def _responses_whole(stream: bytes) -> dict[str, Any] | None:
    events = _events(stream)
    if events is None:
        return None
    completed = None
    for name, event in events:
        kind = (event.get("type") or name) if isinstance(event, dict) else None
        if kind in ("error", "response.failed", "response.incomplete"):
            return None
        if kind == "response.completed" and isinstance(event.get("response"), dict):
            completed = event["response"]
    return completed


def _responses_stream(body: dict[str, Any]) -> bytes | None:
    output = body.get("output")
    if body.get("status") != "completed" or not isinstance(output, list):
        return None
    out: list[bytes] = []

    def emit(kind: str, **data: Any) -> None:
        out.append(_sse({"type": kind, **data, "sequence_number": len(out)}, kind))

    start = {**body, "status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for at, item in enumerate(output):
        kind, item_id = item.get("type"), item.get("id")
        added = {**item, "status": "in_progress"} if "status" in item else dict(item)
        if kind == "message":
            added["content"] = []
        elif kind == "function_call":
            added["arguments"] = ""
        emit("response.output_item.added", output_index=at, item=added)
        for n, part in enumerate((item.get("content") or ()) if kind == "message" else ()):
            where = {"item_id": item_id, "output_index": at, "content_index": n}
            if part.get("type") == "output_text":
                emit("response.content_part.added", **where, part={**part, "text": "", "annotations": []})
                emit("response.output_text.delta", **where, delta=part.get("text", ""), logprobs=[])
                emit("response.output_text.done", **where, text=part.get("text", ""), logprobs=[])
            elif part.get("type") == "refusal":
                emit("response.content_part.added", **where, part={**part, "refusal": ""})
                emit("response.refusal.delta", **where, delta=part.get("refusal", ""))
                emit("response.refusal.done", **where, refusal=part.get("refusal", ""))
            else:
                emit("response.content_part.added", **where, part=part)
            emit("response.content_part.done", **where, part=part)
        if kind == "function_call":
            arguments = item.get("arguments", "")
            emit("response.function_call_arguments.delta", item_id=item_id, output_index=at, delta=arguments)
            emit("response.function_call_arguments.done", item_id=item_id, output_index=at, arguments=arguments)
        emit("response.output_item.done", output_index=at, item=item)
    emit("response.completed", response=body)
    return b"".join(out)


# -- Gemini ---------------------------------------------------------------------------------------


def _gemini_complete(data: dict[str, Any]) -> bool:
    """Every candidate has its finishReason, or the prompt was blocked (no candidates at all)."""
    candidates = data.get("candidates")
    if candidates:
        return all(isinstance(c, dict) and c.get("finishReason") for c in candidates)
    return bool((data.get("promptFeedback") or {}).get("blockReason"))


def _joinable(last: dict[str, Any], part: dict[str, Any]) -> bool:
    """Two text parts of one run (both thoughts or both answer): a signature ends a run."""
    return (isinstance(last.get("text"), str) and isinstance(part.get("text"), str)
            and last.get("thought") == part.get("thought") and set(last) <= {"text", "thought"}
            and set(part) <= {"text", "thought", "thoughtSignature"})


def _gemini_whole(stream: bytes) -> dict[str, Any] | None:
    events = _events(stream)
    if not events:
        return None
    whole: dict[str, Any] = {}
    candidates: dict[int, dict[str, Any]] = {}
    for _, chunk in events:
        if not isinstance(chunk, dict) or chunk.get("error"):
            return None
        whole.update((k, v) for k, v in chunk.items() if k != "candidates")
        for position, candidate in enumerate(chunk.get("candidates") or ()):
            merged = candidates.setdefault(candidate.get("index", position), {})
            for key, value in candidate.items():
                if key != "content":
                    merged[key] = value
                    continue
                content = merged.setdefault("content", {**value, "parts": []})
                parts = content["parts"]
                # Only across chunk boundaries: parts of one chunk stay as they came
                for n, part in enumerate(value.get("parts") or ()):
                    if n == 0 and parts and _joinable(parts[-1], part):
                        parts[-1] = {**parts[-1], **part, "text": parts[-1]["text"] + part["text"]}
                    else:
                        parts.append(part)
    if candidates:
        whole = {"candidates": [candidates[i] for i in sorted(candidates)], **whole}
    return whole if _gemini_complete(whole) else None


def _gemini_stream(body: dict[str, Any]) -> bytes | None:
    # A whole body may be pretty-printed: SSE data must be one line, so it is re-encoded
    return b"data: " + orjson.dumps(body) + b"\r\n\r\n" if _gemini_complete(body) else None


# -- dispatch -------------------------------------------------------------------------------------

# JSON of an unexpected shape (a string where an object belongs, ...) is a cache miss, not a crash
_SHAPE_ERRORS = (AttributeError, TypeError, KeyError)
_Whole = Callable[[bytes], dict[str, Any] | None]
_Stream = Callable[[dict[str, Any]], bytes | None]

REPLAY: dict[tuple[str, str], tuple[_Whole, _Stream]] = {
    ("openai", "chat"): (_chat_whole, _chat_stream),
    ("anthropic", "anthropic.messages"): (_anthropic_whole, _anthropic_stream),
    ("responses", "responses"): (_responses_whole, _responses_stream),
    ("gemini", "gemini.generateContent"): (_gemini_whole, _gemini_stream),
    ("gemini", "gemini.streamGenerateContent"): (_gemini_whole, _gemini_stream),
}


def _guarded(convert: Callable[[Any], Any], data: Any) -> Any:
    try:
        return convert(data)
    except _SHAPE_ERRORS:
        return None


def whole_from_stream(client_format: str, endpoint: str, stream: bytes) -> bytes | None:
    """The whole JSON body equivalent to a complete cached stream; None if there is none."""
    pair = REPLAY.get((client_format, endpoint))
    whole = _guarded(pair[0], stream) if pair is not None else None
    return None if whole is None else orjson.dumps(whole)


def stream_from_whole(client_format: str, endpoint: str, body: bytes) -> bytes | None:
    """The SSE stream equivalent to a cached whole body; None if there is none."""
    pair = REPLAY.get((client_format, endpoint))
    data = _object(body) if pair is not None else None
    return None if pair is None or data is None else _guarded(pair[1], data)
