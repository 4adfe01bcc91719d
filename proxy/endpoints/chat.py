"""POST /api/chat/completions (and its /api/v1 and /v1 spellings): the unified router."""

from __future__ import annotations

from proxy.call import Call
from proxy.endpoints.base import Endpoint
from proxy.endpoints.body import parse_object, split_gateway_params
from proxy.errors import BadRequest

PATHS = ("/api/chat/completions", "/api/v1/chat/completions", "/v1/chat/completions")


def read_call(call: Call, raw: bytes) -> None:
    """Fill the Call from the raw body: parse once, split off gateway params, check the basics."""
    body = parse_object(raw)
    split_gateway_params(call, body)
    call.stream = body.get("stream") is True
    options = body.get("stream_options")
    call.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    messages = body.get("messages")
    if not isinstance(messages, list) and call.params.prompt is None:
        raise BadRequest("Invalid request format: `messages` is required and must be an array")


class ChatCompletions(Endpoint):
    """The ASGI app behind PATHS."""

    endpoint = "chat"

    def read_call(self, call: Call, raw: bytes) -> None:
        read_call(call, raw)
