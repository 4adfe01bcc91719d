"""POST /api/google/gemini/{version}/models/{model}:{method}: the native Gemini API passthrough
(spec 2.2), so Google's `google-genai` SDK works with
`http_options={"base_url": ".../api/google/gemini"}` and the gateway key as its api_key.

- Methods: generateContent, streamGenerateContent, countTokens, embedContent, batchEmbedContents.
  The Call's endpoint is "gemini.<method>" and its client_format "gemini"; the model comes from
  the path and routes like any other (configured names, aliases, `fallback_models`,
  X-Respan-Route-Provider: vertex_ai for Gemini on Vertex AI).
- Respan params: the X-Data-Respan-Params / X-Respan-Customer-Identifier headers, and a
  `respan_params` object in the body (google-genai: `http_options.extra_body`), which is removed
  before forwarding. The key may also come as `?key=` (Google's own query parameter).
- streamGenerateContent always goes upstream with `alt=sse`. A client that asked for SSE gets the
  provider's events byte for byte; one that did not gets Google's other stream shape, a JSON
  array written element by element.
- Errors the gateway answers itself are sent in Google's shape, `{"error": {"code", "message",
  "status"}}`, with their status.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import orjson
from starlette.types import Send

from proxy.call import Call, Reply
from proxy.endpoints.base import Endpoint
from proxy.endpoints.body import error_of, parse_object, send_whole, split_gateway_params
from proxy.errors import NotFound
from proxy.gateway import STREAM_CUT_AT_SHUTDOWN
from proxy.sse import SSEDecoder
from proxy.sse_gemini import gemini_error, gemini_error_event

PREFIX = "/api/google/gemini/"
PATH = re.compile(r"^/api/google/gemini/v1(?:alpha|beta)?\d*/models/(?P<model>[^/].*):(?P<method>[A-Za-z]+)$")
METHODS = ("generateContent", "streamGenerateContent", "countTokens", "embedContent", "batchEmbedContents")
GATEWAY_KEYS = ("respan_params", "keywordsai_params")
SSE = "gemini_sse"  # call.state key: the client asked for `alt=sse`
USAGE = f"POST {PREFIX}v1beta/models/{{model}}:{{{'|'.join(METHODS)}}}"


def read_call(call: Call, raw: bytes) -> None:
    match = PATH.match(call.path)
    if match is None or match["method"] not in METHODS:
        raise NotFound(f"Not found: {call.path}; the Gemini passthrough serves {USAGE}")
    read_request(call, raw, match["model"], match["method"])


def read_request(call: Call, raw: bytes, model: str, method: str) -> None:
    """Fill the Call from a native Gemini request for `model` and `method` (taken from its path)."""
    query = parse_qs(call.query)
    if "key" in query and not any(h in call.headers for h in ("authorization", "x-api-key", "x-goog-api-key")):
        call.headers = {**call.headers, "x-goog-api-key": query["key"][0]}
    body = parse_object(raw)
    nested = {key: body.pop(key) for key in GATEWAY_KEYS if key in body}
    split_gateway_params(call, nested)  # only the nested containers: the other fields are Gemini's
    call.body = body
    call.model = model
    call.stream = method == "streamGenerateContent"
    call.client_wants_usage = False
    if call.stream:
        call.state[SSE] = query.get("alt") == ["sse"]


def gemini_error_body(reply: Reply) -> bytes:
    """A gateway (or OpenAI-shaped) error body -> Google's error body; Google's as it is."""
    data, message = error_of(reply)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("status"), str) and isinstance(error.get("code"), int):
        return reply.body
    return orjson.dumps(gemini_error(reply.status, message))


async def json_array(relay: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """SSE events -> the elements of a JSON array, written as they come (`[a`, `,\\r\\nb`, ..., `]`)."""
    decoder = SSEDecoder()
    opened = False
    try:
        async for data in relay:
            items = [payload for _, payload in decoder.feed(data) if payload]
            if items:
                yield (b",\r\n" if opened else b"[") + b",\r\n".join(items)
                opened = True
        items = [payload for _, payload in decoder.flush() if payload]
        yield (b",\r\n" if opened else b"[") + b",\r\n".join(items) + b"]" if items else (b"]" if opened else b"[]")
    finally:
        await relay.aclose()  # type: ignore[attr-defined]


class GeminiPassthrough(Endpoint):
    """The ASGI app for every path under PREFIX (streams relayed with the Gemini tap)."""

    client_format = "gemini"

    def endpoint_for(self, path: str) -> str:
        method = path.rpartition(":")[2]
        return f"gemini.{method}" if method in METHODS else "gemini"

    def read_call(self, call: Call, raw: bytes) -> None:
        read_call(call, raw)

    @staticmethod
    def shutdown_event() -> bytes:
        return gemini_error_event(STREAM_CUT_AT_SHUTDOWN, 503)

    @staticmethod
    def is_last(call: Call, data: bytes) -> bool:
        """A Gemini stream has no closing event: it ends when the upstream body does."""
        return False

    def relay(self, call: Call, reply: Reply) -> tuple[AsyncIterator[bytes], str]:
        relay, media_type = super().relay(call, reply)
        if call.state.get(SSE, True):
            return relay, media_type
        return json_array(relay), "application/json"

    async def send_whole(self, call: Call, reply: Reply, send: Send) -> None:
        if reply.status >= 400:
            reply.body = gemini_error_body(reply)
            reply.media_type = "application/json"
        await send_whole(self.gateway, call, reply, send)
