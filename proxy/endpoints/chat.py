"""POST /api/chat/completions (and its /api/v1 and /v1 spellings): the unified router."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy.call import Call
from proxy.endpoints.body import parse_object, read_body
from proxy.errors import BadRequest, GatewayError, ValidationFailed
from proxy.gateway import Gateway
from proxy.params import EMPTY, ParamsError, split_params

PATHS = ("/api/chat/completions", "/api/v1/chat/completions", "/v1/chat/completions")
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def read_call(call: Call, raw: bytes) -> None:
    """Fill the Call from the raw body: parse once, split off gateway params, check the basics."""
    body = parse_object(raw)
    headers = call.headers
    try:
        call.params = split_params(
            body,
            headers.get("x-data-respan-params") or headers.get("x-data-keywordsai-params"),
            headers.get("x-respan-customer-identifier"),
        )
    except ParamsError as exc:
        raise ValidationFailed(exc.field, exc.message) from None
    call.body = body
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationFailed("model", f"Expected `str`, got `{type(model).__name__}`")
    call.model = model or ""
    call.stream = body.get("stream") is True
    options = body.get("stream_options")
    call.client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    messages = body.get("messages")
    if not isinstance(messages, list) and call.params.prompt is None:
        raise BadRequest("Invalid request format: `messages` is required and must be an array")


def routes(gateway: Gateway) -> list[Route]:
    limit = gateway.settings.server.max_body_bytes

    async def chat_completions(request: Request) -> Response:
        call = Call(
            endpoint="chat",
            path=request.url.path,
            body={},
            params=EMPTY,
            headers=request.headers,
            client_ip=request.client.host if request.client else None,
        )
        try:
            read_call(call, await read_body(request, limit))
        except GatewayError as exc:
            reply = gateway.error_reply(call, exc)
            gateway.metrics.in_flight.inc()  # finish() decrements it
            gateway.finish(call)
            return Response(reply.body, reply.status, gateway.response_headers(call, reply), "application/json")
        reply = await gateway.handle(call)
        headers = gateway.response_headers(call, reply)
        if reply.stream is None:
            return Response(reply.body, reply.status, headers, reply.media_type)
        headers.update(STREAM_HEADERS)
        return StreamingResponse(gateway.relay(call, reply.stream), reply.status, headers, "text/event-stream")

    return [Route(path, chat_completions, methods=["POST"]) for path in PATHS]
