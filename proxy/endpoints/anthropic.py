"""POST /api/anthropic/v1/messages and /api/anthropic/v1/messages/count_tokens: the native
Anthropic passthrough (spec 2.2), so the official `anthropic` SDK works with
`base_url=".../api/anthropic/"` and the gateway key.

- Respan params come from `metadata.respan_params` (spec 1.3), merged with the usual header
  channels (X-Data-Respan-Params, X-Respan-Customer-Identifier); `metadata.extra_headers` are
  extra upstream headers. Both keys are stripped from `metadata` before forwarding (Anthropic
  accepts only `metadata.user_id`; an emptied `metadata` is dropped). Top-level body fields are
  Anthropic's own and are never read as gateway params.
- `max_tokens` defaults to 4096 when absent (messages only).
- The Call has client_format "anthropic": the adapter forwards the body as it is and the answer's
  bytes (whole, or the SSE stream) come back unchanged.
- Errors the gateway answers itself (bad key, unknown model, bad request) are sent in Anthropic's
  format, `{"type":"error","error":{"type","message"}}`, with their status.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Send

from proxy.call import Call, Reply
from proxy.endpoints.base import Endpoint
from proxy.endpoints.body import error_of, parse_object, send_whole, split_gateway_params
from proxy.errors import BadRequest, ValidationFailed
from proxy.gateway import STREAM_CUT_AT_SHUTDOWN, STREAM_DONE
from proxy.sse_anthropic import anthropic_error_event

MESSAGES = "/api/anthropic/v1/messages"
COUNT_TOKENS = "/api/anthropic/v1/messages/count_tokens"
PATHS = (MESSAGES, COUNT_TOKENS)
DEFAULT_MAX_TOKENS = 4096
GATEWAY_METADATA = ("respan_params", "keywordsai_params", "extra_headers")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}



def read_call(call: Call, raw: bytes) -> None:
    read_body(call, parse_object(raw))


def read_body(call: Call, body: dict[str, Any]) -> None:
    """Fill the Call from a parsed Anthropic Messages (or count_tokens) body."""
    metadata = body.get("metadata")
    nested: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise BadRequest("metadata: Input should be an object")
        metadata = dict(metadata)
        for key in GATEWAY_METADATA:
            if key in metadata:
                nested[key] = metadata.pop(key)
        if metadata:
            body["metadata"] = metadata
        else:
            del body["metadata"]
    if "extra_headers" in nested:
        headers = nested["extra_headers"]
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValidationFailed("extra_headers", "Expected an object of header names to string values")
        params = nested.get("respan_params")
        if params is None or isinstance(params, dict):
            nested["respan_params"] = {"extra_headers": headers, **(params or {})}
        del nested["extra_headers"]
    # only the nested containers are gateway params here: top-level fields are Anthropic's
    split_gateway_params(call, nested)
    call.body = body
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationFailed("model", f"Expected `str`, got `{type(model).__name__}`")
    call.model = model or ""
    if not call.model:
        raise BadRequest("model: Field required")
    if not isinstance(body.get("messages"), list):
        raise BadRequest("messages: Field required (an array)")
    if call.endpoint == "anthropic.messages":
        call.stream = body.get("stream") is True
        if body.get("max_tokens") is None:
            body["max_tokens"] = DEFAULT_MAX_TOKENS
    else:
        call.stream = False
    call.client_wants_usage = False


def anthropic_error(reply: Reply) -> bytes:
    """A gateway (or OpenAI-shaped) error body -> Anthropic's error body; Anthropic's as it is."""
    data, message = error_of(reply)
    if isinstance(data, dict) and data.get("type") == "error":
        return reply.body
    kind = ERROR_TYPES.get(reply.status, "api_error" if reply.status >= 500 else "invalid_request_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


class AnthropicPassthrough(Endpoint):
    """The ASGI app behind PATHS (streams relayed byte for byte with the Anthropic tap)."""

    client_format = "anthropic"

    def endpoint_for(self, path: str) -> str:
        return "anthropic.count_tokens" if path == COUNT_TOKENS else "anthropic.messages"

    def read_call(self, call: Call, raw: bytes) -> None:
        read_call(call, raw)

    @staticmethod
    def shutdown_event() -> bytes:
        return anthropic_error_event(STREAM_CUT_AT_SHUTDOWN, "overloaded_error")

    @staticmethod
    def is_last(call: Call, data: bytes) -> bool:
        """An Anthropic stream ends with its message_stop event (the relay marks the piece)."""
        return call.state.get(STREAM_DONE, False)

    async def send_whole(self, call: Call, reply: Reply, send: Send) -> None:
        if reply.status >= 400:
            reply.body = anthropic_error(reply)
            reply.media_type = "application/json"
        await send_whole(self.gateway, call, reply, send)
