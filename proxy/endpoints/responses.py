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

import logging

from starlette.types import Receive, Scope, Send

from proxy.call import Call
from proxy.endpoints.body import parse_object, read_body, request_headers, split_gateway_params
from proxy.endpoints.chat import ChatCompletions
from proxy.errors import BadRequest, GatewayError, InternalError
from proxy.gateway import STREAM_CUT_AT_SHUTDOWN, STREAM_DONE
from proxy.params import EMPTY
from proxy.sse_responses import responses_error_event

PATHS = ("/api/responses", "/api/v1/responses", "/v1/responses")

logger = logging.getLogger("llmrelay")


def read_call(call: Call, raw: bytes) -> None:
    """Fill the Call from the raw body: parse once, split off gateway params, check the fields."""
    body = parse_object(raw)
    split_gateway_params(call, body)
    if not call.model:
        raise BadRequest("Invalid request format: `model` is required")
    call.stream = body.get("stream") is True
    call.client_wants_usage = False


class Responses(ChatCompletions):
    """The ASGI app behind PATHS (the stream relay is the chat endpoint's, with the Responses tap)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        headers = request_headers(scope)
        client = scope.get("client")
        call = Call(endpoint="responses", path=scope["path"], body={}, params=EMPTY, headers=headers,
                    client_ip=client[0] if client else None, client_format="responses")
        try:
            read_call(call, await read_body(headers, receive, self.limit))
        except GatewayError as exc:
            await self.send_whole(call, gateway.reject(call, exc), send)
            return
        except Exception:
            logger.exception("unhandled error reading request %s", call.id)
            await self.send_whole(call, gateway.reject(call, InternalError()), send)
            return
        reply = await gateway.handle(call)
        if reply.stream is None:
            await self.send_whole(call, reply, send)
        else:
            await self.send_stream(call, reply, receive, send)

    @staticmethod
    def shutdown_event() -> bytes:
        return responses_error_event(STREAM_CUT_AT_SHUTDOWN, "server_error")

    @staticmethod
    def is_last(call: Call, data: bytes) -> bool:
        """A Responses stream ends with its terminal event (the relay marks the piece)."""
        return call.state.get(STREAM_DONE, False)
