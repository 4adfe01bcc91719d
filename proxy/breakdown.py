"""`request_breakdown: true` (spec 2.1.2): a summary of the request in the answer itself."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.call import Call


def request_breakdown(call: Call) -> dict[str, Any]:
    keep_content = not call.params.disable_log
    completion = call.completion[0] if isinstance(call.completion, list) and call.completion else None
    return {
        "prompt_tokens": call.usage.prompt_tokens,
        "completion_tokens": call.usage.completion_tokens,
        "cost": call.cost,
        "prompt_messages": call.body.get("messages") if keep_content else None,
        "completion_message": completion if keep_content else None,
        "model": call.response_model or (call.target.model if call.target else call.model),
        "cached": bool(call.state.get("cache_hit")),
        "timestamp": datetime.now(UTC).isoformat(),
        "status_code": call.status_code,
        "stream": call.stream,
        "latency": call.elapsed(),
        "scores": {},
        "category": None,
        "metadata": call.params.metadata,
        "routing_time": call.routing_time,
        "full_request": call.body if keep_content else None,
        "sentiment_score": None,
    }


def add_to_body(call: Call, body: bytes) -> bytes:
    """A non-stream answer with a top-level `request_breakdown` object."""
    data = orjson.loads(body)
    data["request_breakdown"] = request_breakdown(call)
    return orjson.dumps(data)


def stream_chunk(call: Call) -> bytes:
    """The extra final chunk of a stream, before [DONE]."""
    chunk = {
        "id": "request_breakdown",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "extra_parameter",
        "choices": [{"index": 0, "delta": {}, "finish_reason": None, "request_breakdown": request_breakdown(call)}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
