"""POST /api/responses (and its /api/v1 and /v1 spellings): the OpenAI Responses API, passed through.

The body is parsed once and the gateway params are split off exactly as for chat (body fields and
the X-Data-Respan-Params header); the Call (endpoint "responses", client_format "responses") runs
the whole pipeline: `model` is routed (configured names, aliases, fallbacks, credentials). The
OpenAI-compatible providers send it to `{base_url}/responses` and Azure to its Responses URL; the
others answer 400 (Gateway.dispatch). The body goes upstream as it is with only `model` replaced,
and the answer comes back byte for byte, streams too (the relay reads them with the
ResponsesStreamTap; a break after the first byte ends the stream with an `event: error`).
"""

from __future__ import annotations

from proxy.call import Call
from proxy.endpoints.base import Endpoint
from proxy.endpoints.body import parse_object, split_gateway_params
from proxy.errors import BadRequest
from proxy.gateway import STREAM_CUT_AT_SHUTDOWN, STREAM_DONE
from proxy.sse_responses import responses_error_event

PATHS = ("/api/responses", "/api/v1/responses", "/v1/responses")



def read_call(call: Call, raw: bytes) -> None:
    """Fill the Call from the raw body: parse once, split off gateway params, check the fields."""
    body = parse_object(raw)
    own_prompt = body.get("prompt")
    if isinstance(own_prompt, dict) and "id" in own_prompt and "prompt_id" not in own_prompt:
        body.pop("prompt")  # OpenAI's stored prompt ({"id": "pmpt_..."}), not a gateway param: it goes upstream
    else:
        own_prompt = None
    split_gateway_params(call, body)
    if own_prompt is not None:
        body["prompt"] = own_prompt
    if not call.model:
        raise BadRequest("Invalid request format: `model` is required")
    call.stream = body.get("stream") is True
    call.client_wants_usage = False


class Responses(Endpoint):
    """The ASGI app behind PATHS (streams relayed with the Responses tap)."""

    endpoint = "responses"
    client_format = "responses"

    def read_call(self, call: Call, raw: bytes) -> None:
        read_call(call, raw)

    @staticmethod
    def shutdown_event() -> bytes:
        return responses_error_event(STREAM_CUT_AT_SHUTDOWN, "server_error")

    @staticmethod
    def is_last(call: Call, data: bytes) -> bool:
        """A Responses stream ends with its terminal event (the relay marks the piece)."""
        return call.state.get(STREAM_DONE, False)
