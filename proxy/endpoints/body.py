"""What every plain-ASGI endpoint shares: reading and parsing the body once, splitting off the
gateway params, and sending a whole reply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

from proxy.call import Call, Reply
from proxy.errors import BadRequest, PayloadTooLarge, ValidationFailed
from proxy.params import ParamsError, decode_header, split_params

if TYPE_CHECKING:
    from proxy.gateway import Gateway


# Input limits (README "Input limits"). JSON nesting: orjson reads at most 1024 levels but writes at
# most 254, and the body is written again (upstream, the log record, the cache key) inside a few more
# levels, so a deeper body would fail later as a 500: refuse it up front.
MAX_JSON_DEPTH = 128
MAX_ITEMS = 10_000  # items in any top-level array of a body (`messages`, `input`, `contents`, `tools`, ...)
DEPTH_ERROR = f"Invalid request format: the JSON nests deeper than {MAX_JSON_DEPTH} levels (the gateway's limit)"


ORJSON_MAX_DEPTH = 254  # orjson.dumps raises TypeError on containers nested deeper


def nests_deeper(data: Any, limit: int) -> bool:
    """Whether `data` (parsed JSON) has containers more than `limit` levels deep (the top level is 1).

    orjson does the walk, in C: wrapped in ORJSON_MAX_DEPTH - limit more levels, `data` fails to
    serialize exactly when it nests deeper than `limit` (26 us for a 37 KB body of 200 messages,
    against 390 us for a walk in Python)."""
    wrapped = data
    for _ in range(ORJSON_MAX_DEPTH - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except TypeError:
        return True
    return False


def parse_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("Invalid request format: the body is empty; expected a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise BadRequest(DEPTH_ERROR) from None
        raise BadRequest(f"Invalid request format: the body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest(f"Invalid request format: expected a JSON object, got {type(data).__name__}")
    # every container opens with [ or {: a body with fewer of them than the limit cannot nest deeper
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and nests_deeper(data, MAX_JSON_DEPTH):
        raise BadRequest(DEPTH_ERROR)
    for field, value in data.items():
        if type(value) is list and len(value) > MAX_ITEMS:
            raise ValidationFailed(field, f"At most {MAX_ITEMS} items (the gateway's limit), got {len(value)}")
    return data


async def read_body(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes is over the limit of {limit} bytes")
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise BadRequest("Invalid request format: the client closed the connection before sending the body")
        body += message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body is over the limit of {limit} bytes")
        if not message.get("more_body", False):
            return body


def request_headers(scope: Scope) -> dict[str, str]:
    """ASGI header names are lower-case; a repeated header keeps its last value."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def split_gateway_params(call: Call, body: dict[str, Any]) -> None:
    """Split the gateway params (body fields and the params headers) off `body` into call.params,
    and set call.body and call.model. The same for every endpoint."""
    headers = call.headers
    header_params = headers.get("x-data-respan-params") or headers.get("x-data-keywordsai-params")
    try:
        if header_params and nests_deeper(decode_header(header_params), MAX_JSON_DEPTH):
            # as for the body: values nested deeper fail later, when written back as JSON
            raise ParamsError("X-Data-Respan-Params",
                              f"the JSON nests deeper than {MAX_JSON_DEPTH} levels (the gateway's limit)")
        call.params = split_params(body, header_params, headers.get("x-respan-customer-identifier"))
    except ParamsError as exc:
        raise ValidationFailed(exc.field, exc.message) from None
    call.body = body
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationFailed("model", f"Expected `str`, got `{type(model).__name__}`")
    call.model = model or ""


async def send_whole(gateway: Gateway, call: Call, reply: Reply, send: Send) -> None:
    """Send a whole (non-stream) Reply with the gateway's response headers."""
    raw = gateway.response_headers(call, reply, reply.media_type)
    raw.append((b"content-length", b"%d" % len(reply.body)))
    await send({"type": "http.response.start", "status": reply.status, "headers": raw})
    await send({"type": "http.response.body", "body": reply.body})


def error_of(reply: Reply) -> tuple[Any, str]:
    """(the parsed body, its message) of an error reply in any shape the gateway sends: its own
    `{"detail", "errors"}`, OpenAI's `{"error": {"message"}}` or `{"error": "..."}`; a body of
    another shape gives the start of its text. For the native endpoints, which answer errors in
    their provider's own shape."""
    try:
        data = orjson.loads(reply.body) if reply.body else None
    except orjson.JSONDecodeError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        elif isinstance(data.get("detail"), str):
            message = data["detail"]
            errors = data.get("errors")
            if isinstance(errors, dict) and errors:
                message += ": " + "; ".join(f"{k}: {' '.join(map(str, v))}" for k, v in errors.items())
    if not isinstance(message, str) or not message:
        message = reply.body[:500].decode("utf-8", "replace") or f"HTTP {reply.status}"
    return data, message
