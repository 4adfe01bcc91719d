"""POST /api/google/vertexai/{version}/[projects/{p}/locations/{l}/]publishers/{publisher}/models/{model}:{method}:
the native Vertex AI passthrough (spec 2.2), for Vertex SDKs and tools pointed at the gateway
(google-genai with `vertexai=True`, Claude Code's Vertex mode).

- publishers/google: Gemini's format (generateContent, streamGenerateContent, countTokens), read
  as the Gemini passthrough reads it (proxy.endpoints.gemini).
- publishers/anthropic: Anthropic's Messages format as Vertex AI takes it (rawPredict,
  streamRawPredict; `count-tokens:rawPredict` names its model in the body). The body's
  `anthropic_version` is dropped and the model from the path added, so the Call is an ordinary
  Anthropic passthrough call (proxy.endpoints.anthropic): it may route or fall back to Anthropic
  itself, and the Vertex AI adapter puts `anthropic_version` back.

The project and location in the path are the client's view; the gateway's vertex_ai provider
configuration decides where the call goes. Like every passthrough, it goes to its native provider
by default: without an X-Respan-Route-Provider header of the client's, the call is pinned to the
configured Vertex AI provider (when there is one, and the routing stage runs); `fallback_models`
may still leave it.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import Receive, Scope, Send

from proxy.call import Call
from proxy.endpoints import anthropic, gemini
from proxy.endpoints.body import parse_object
from proxy.errors import NotFound
from proxy.gateway import Gateway

PREFIX = "/api/google/vertexai/"
PATH = re.compile(r"^/api/google/vertexai/v1(?:beta1)?/(?:projects/[^/]+/locations/[^/]+/)?"
                  r"publishers/(?P<publisher>google|anthropic)/models/(?P<model>[^/]+):(?P<method>[A-Za-z]+)$")
GEMINI_METHODS = ("generateContent", "streamGenerateContent", "countTokens")
ANTHROPIC_METHODS = ("rawPredict", "streamRawPredict")
COUNT_TOKENS = "count-tokens"  # Claude's token counting "model"
USAGE = (f"POST {PREFIX}v1/projects/{{project}}/locations/{{location}}/publishers/google/models/{{model}}:"
         f"{{{'|'.join(GEMINI_METHODS)}}}, or .../publishers/anthropic/models/{{model}}:{{{'|'.join(ANTHROPIC_METHODS)}}}")


ROUTE_HEADER = "x-respan-route-provider"


def _pin_to_vertex(call: Call, gateway: Gateway) -> None:
    """Without the client's own X-Respan-Route-Provider, route to the configured Vertex AI provider."""
    provider = gateway.models.serving.get("vertex_ai")
    if provider is not None and ROUTE_HEADER not in call.headers:
        call.headers = {**call.headers, ROUTE_HEADER: provider.id}


def _match(path: str) -> re.Match[str]:
    match = PATH.match(path)
    methods = GEMINI_METHODS if match and match["publisher"] == "google" else ANTHROPIC_METHODS
    if match is None or match["method"] not in methods:
        raise NotFound(f"Not found: {path}; the Vertex AI passthrough serves {USAGE}")
    return match


class VertexGemini(gemini.GeminiPassthrough):
    def read_call(self, call: Call, raw: bytes) -> None:
        match = _match(call.path)
        gemini.read_request(call, raw, match["model"], match["method"])
        _pin_to_vertex(call, self.gateway)


class VertexAnthropic(anthropic.AnthropicPassthrough):
    def endpoint_for(self, path: str) -> str:
        match = PATH.match(path)
        counting = match is not None and match["model"] == COUNT_TOKENS
        return "anthropic.count_tokens" if counting else "anthropic.messages"

    def read_call(self, call: Call, raw: bytes) -> None:
        match = _match(call.path)
        body: dict[str, Any] = parse_object(raw)
        body.pop("anthropic_version", None)
        if match["model"] != COUNT_TOKENS:
            if match["method"] == "streamRawPredict":
                body["stream"] = True
            else:
                body.pop("stream", None)
            body["model"] = match["model"]
        anthropic.read_body(call, body)
        _pin_to_vertex(call, self.gateway)


class VertexPassthrough:
    """The ASGI app for every path under PREFIX: Gemini's format or Anthropic's, by publisher."""

    def __init__(self, gateway: Gateway) -> None:
        self.gemini = VertexGemini(gateway)
        self.anthropic = VertexAnthropic(gateway)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.anthropic if "/publishers/anthropic/" in scope["path"] else self.gemini
        await endpoint(scope, receive, send)
