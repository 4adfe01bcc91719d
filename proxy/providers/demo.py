"""The built-in `demo` provider: deterministic local answers, so a newcomer gets a reply with no key.

It answers in OpenAI format, echoing the last user message; streams word by word; honours `n`,
`stream_options.include_usage` and `max_tokens`; and calls the first tool when `tool_choice`
names one or is "required".

Embeddings (`call.endpoint == "embeddings"`): a deterministic unit vector per input, derived from
a SHA-256 of the input (`dimensions` long, default 8), as floats or base64 little-endian float32
like OpenAI; usage counts words (or tokens, for token input).
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.call import Call, Reply, Target


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text, note the images
        out = []
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text":
                    out.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    out.append("[image]")
        return " ".join(out)
    return ""


def _count(text: str) -> int:
    return len(text.split())


DEMO_DIMENSIONS = 8


def demo_vector(item: Any, dimensions: int) -> list[float]:
    """A deterministic unit vector for one input (text or token list)."""
    seed = orjson.dumps(item)
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        raw.extend(b / 127.5 - 1.0 for b in digest)
        counter += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def embedding_inputs(value: Any) -> list[Any]:
    """The input as a list of items: a string or a token list is one item."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, int) for v in value)):
        return [value]
    return list(value) if isinstance(value, list) else [value]


class DemoProvider:
    endpoints = frozenset({"chat", "embeddings"})  # the Call.endpoint values served (see Gateway.dispatch)

    def embeddings(self, call: Call, target: Target) -> Reply:
        body = call.body
        dimensions = body.get("dimensions")
        dimensions = dimensions if isinstance(dimensions, int) and 0 < dimensions <= 4096 else DEMO_DIMENSIONS
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for i, item in enumerate(embedding_inputs(body.get("input"))):
            vector = demo_vector(item, dimensions)
            tokens += len(item) if isinstance(item, list) else max(_count(str(item)), 1)
            embedding: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        payload = {"object": "list", "data": data, "model": target.model,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return Reply(200, body=orjson.dumps(payload))

    def answer(self, body: dict[str, Any]) -> tuple[str, int]:
        messages = body.get("messages") or []
        last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
        said = _text(last.get("content")) if last else ""
        words = f"Hello from the llmrelay demo provider. You said: {said}".split()
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and limit > 0:
            words = words[:limit]
        prompt_tokens = sum(_count(_text(m.get("content"))) + 3 for m in messages if isinstance(m, dict))
        return " ".join(words), prompt_tokens

    def tool_call(self, body: dict[str, Any]) -> dict[str, Any] | None:
        tools = body.get("tools") or []
        choice = body.get("tool_choice")
        if not tools:
            return None
        name = None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
        elif choice == "required":
            name = (tools[0].get("function") or {}).get("name")
        if not name:
            return None
        return {"id": "call_demo_0", "type": "function", "function": {"name": name, "arguments": "{}"}}

    async def send(self, call: Call, target: Target) -> Reply:
        if call.endpoint == "embeddings":
            return self.embeddings(call, target)
        body = call.body
        text, prompt_tokens = self.answer(body)
        tool = self.tool_call(body)
        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 1) > 0 else 1
        completion_tokens = (_count(text) if tool is None else 3) * n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        created = int(time.time())
        rid = f"chatcmpl-demo-{call.id[:12]}"
        if call.stream:
            return Reply(200, stream=self.stream(rid, created, target.model, text, tool, n, usage, call),
                         media_type="text/event-stream")
        if tool is not None:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [tool]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": text}
            finish = "stop"
        payload = {
            "id": rid, "object": "chat.completion", "created": created, "model": target.model,
            "choices": [{"index": i, "message": message, "finish_reason": finish, "logprobs": None} for i in range(n)],
            "usage": usage,
        }
        return Reply(200, body=orjson.dumps(payload))

    async def stream(self, rid: str, created: int, model: str, text: str, tool: dict[str, Any] | None,
                     n: int, usage: dict[str, int], call: Call) -> AsyncIterator[bytes]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra}
            return b"data: " + orjson.dumps(data) + b"\n\n"

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)])
        if tool is not None:
            delta = {"tool_calls": [{"index": 0, **tool}]}
            yield chunk([{"index": i, "delta": delta, "finish_reason": None} for i in range(n)])
            finish = "tool_calls"
        else:
            words = text.split(" ")
            for j, word in enumerate(words):
                piece = word if j == 0 else " " + word
                yield chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None} for i in range(n)])
            finish = "stop"
        yield chunk([{"index": i, "delta": {}, "finish_reason": finish} for i in range(n)])
        # The relay always asks for usage; this provider is local, so it just checks the flag.
        yield chunk([], usage=usage)
        yield b"data: [DONE]\n\n"

    async def close(self) -> None:
        return None
