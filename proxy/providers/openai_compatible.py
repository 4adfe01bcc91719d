"""Providers that speak the OpenAI Chat Completions API: bytes pass through unchanged.

They serve the Embeddings API too: a Call with endpoint "embeddings" goes to `{base_url}/embeddings`,
and the Responses API: a Call with endpoint "responses" goes to `{base_url}/responses` (the body
passes through with only `model` replaced; the stream is the provider's own, never changed).
"""

from __future__ import annotations

import orjson

from proxy.call import Call, Reply, Target
from proxy.providers.common import post_upstream
from proxy.settings import Provider, Timeouts
from proxy.upstream import UpstreamClient

PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings", "responses": "/responses"}  # Call.endpoint -> path under base_url


class OpenAICompatible:
    endpoints = frozenset(PATHS)  # the Call.endpoint values this adapter serves (see Gateway.dispatch)

    def __init__(self, config: Provider, timeouts: Timeouts, upstream: UpstreamClient) -> None:
        self.config = config
        self.timeouts = config.timeouts or timeouts
        self.upstream = upstream
        self.static_headers = {"Content-Type": "application/json", **config.headers}
        self.defaults = config.defaults
        self._headers_by_key: dict[str | None, dict[str, str]] = {}  # treated as read-only

    def request_body(self, call: Call, target: Target) -> bytes:
        body = call.body
        # only chat streams get the usage chunk asked for (a Responses stream reports usage itself)
        add_usage = call.stream and not call.client_wants_usage and call.endpoint == "chat"
        if self.defaults and call.endpoint == "chat":
            body = {**self.defaults, **body}
        if body.get("model") != target.model or add_usage:
            body = dict(body)
            body["model"] = target.model
            if add_usage:
                # Every stream is accounted: ask for the usage chunk; the relay hides it from
                # a client that did not ask for it.
                options = body.get("stream_options")
                body["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) else {
                    "include_usage": True
                }
        return orjson.dumps(body)

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The headers that carry an API key (a hook: Azure sends `api-key` instead)."""
        return {"Authorization": f"Bearer {api_key}"}

    def url(self, call: Call, target: Target) -> str:
        """Where the request goes (a hook: Azure builds deployment URLs)."""
        return (target.base_url or self.config.base_url).rstrip("/") + PATHS[call.endpoint]

    def request_headers(self, target: Target) -> dict[str, str]:
        if target.custom_credential:
            return self._custom_headers(target)
        if not target.extra_headers:  # the usual case: built once per configured credential
            headers = self._headers_by_key.get(target.api_key)
            if headers is not None:
                return headers
        headers = dict(self.static_headers)
        if target.api_key:
            headers.update(self.auth_headers(target.api_key))
        if target.extra_headers:
            headers.update(target.extra_headers)
        elif len(self._headers_by_key) < 1000:
            self._headers_by_key[target.api_key] = headers
        return headers

    def _custom_headers(self, target: Target) -> dict[str, str]:
        """A request-supplied credential: never cached, and never sent with the provider's
        configured headers (which may hold secrets) to a base URL the client chose."""
        own_url = not target.base_url or target.base_url == self.config.base_url
        headers = dict(self.static_headers) if own_url else {"Content-Type": "application/json"}
        if target.api_key:
            headers.update(self.auth_headers(target.api_key))
        if target.extra_headers:
            headers.update(target.extra_headers)
        return headers

    async def send(self, call: Call, target: Target) -> Reply:
        url = self.url(call, target)
        response, body = await post_upstream(self, call, target, url, self.request_headers(target),
                                             self.request_body(call, target))
        headers = response.pass_headers()
        if body is None:
            return Reply(200, stream=response.chunks(), headers=headers, media_type="text/event-stream")
        media_type = response.headers.get("Content-Type", "application/json")
        return Reply(response.status, body=body, headers=headers, media_type=media_type)

    async def close(self) -> None:
        return None
