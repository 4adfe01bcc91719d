"""Google Vertex AI: Gemini and Anthropic Claude models behind one provider, OAuth from a service account.

The model picks the wire format (the translation is the Gemini and Anthropic adapters', imported):

- a model whose name starts with `claude` -> Anthropic Messages on
  `{root}/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:rawPredict`
  (streams: `:streamRawPredict`); the body is the Messages body without `model` and with
  `"anthropic_version": "vertex-2023-10-16"` (or the provider's `api_version` when it starts with
  `vertex-`). Model names keep their `@version` suffix (`claude-sonnet-4-5@20250929`).
- any other model -> Gemini on `.../publishers/google/models/{model}:generateContent` (streams:
  `:streamGenerateContent?alt=sse`).

Native passthroughs: an Anthropic-format Call (client_format "anthropic") for a Claude model goes
as it is to rawPredict / streamRawPredict (count_tokens: `.../publishers/anthropic/models/
count-tokens:rawPredict`, the model named in the body); a Gemini-format Call (client_format
"gemini") for any other model goes as it is to `:generateContent`, `:streamGenerateContent?alt=sse`
or `:countTokens` (Vertex AI embeds through another API, so the Gemini embedding methods are not
served here).

Configuration (settings.Provider, no new fields):

    - id: vertex
      protocol: vertex_ai
      base_url: https://us-central1-aiplatform.googleapis.com   # the location's endpoint
      api_key: ${VERTEX_SERVICE_ACCOUNT_JSON}                 # the service-account JSON text

- `api_key` is the whole service-account key file (JSON text; an environment variable keeps it
  out of the config). It is checked when the gateway starts (a config error names the field, never
  the key).
- `base_url` is `https://{location}-aiplatform.googleapis.com` (or `https://aiplatform.googleapis.com`
  for location `global`), optionally followed by `/v1/projects/{project}/locations/{location}`.
- project: the one in base_url, else the service account's `project_id`; for a request
  credential: its `vertex_ai_project`, else its service account's `project_id`, else base_url's. location: a credential's `vertex_ai_location`, else the one in
  base_url's path, else the `{location}-` of a Google endpoint host (`global` for
  aiplatform.googleapis.com). A credential's location on a Google endpoint also moves the request
  to that location's host.

Request credentials (customer_credentials, credential_override, load-balance entries) may carry
`vertex_ai_credentials` (the service-account JSON object or its text; `api_key` is accepted as
the same), `vertex_ai_project` and `vertex_ai_location`. Such a credential is self-contained: it
never uses the configured service account.

Auth: `Authorization: Bearer <access token>`, the token from google_auth.TokenCache (cached per
service account until five minutes before it expires; concurrent requests share one refresh). A
token endpoint that refuses answers a 502 that names the provider and the service account's email
(never the key).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec
import orjson

from proxy.call import Call, Reply, Target
from proxy.errors import BadRequest, UpstreamUnavailable, ValidationFailed
from proxy.providers.anthropic import AnthropicMessages
from proxy.providers.common import bounded_get
from proxy.providers.gemini import GeminiGenerateContent, native_body, native_method, send_native
from proxy.providers.google_auth import InvalidServiceAccount, ServiceAccount, TokenCache
from proxy.settings import ConfigError, Provider, Timeouts
from proxy.upstream import UpstreamClient

VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
GOOGLE_HOST = re.compile(r"^(?:(?P<location>[a-z0-9-]+)-)?aiplatform\.googleapis\.com$")
LOCATION_PATH = re.compile(r"/v1(?:beta1)?/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/?$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TOKEN_URI_FIELD = "vertex_ai_credentials.token_uri"  # a caller's service account: checked by the egress policy
_CACHE_LIMIT = 1000


def _segment(model: str) -> str:
    return quote(model, safe="-._~@")


def is_claude(model: str) -> bool:
    return model.lower().startswith("claude")


class VertexBase:
    """A base_url taken apart: root (scheme://host), and the project / location it names."""

    __slots__ = ("root", "project", "location", "google")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        self.root = f"{parts.scheme}://{parts.netloc}"
        match = LOCATION_PATH.search(parts.path)
        self.project = match["project"] if match else None
        host = GOOGLE_HOST.match(parts.hostname or "")
        self.google = host is not None
        self.location = match["location"] if match else (host["location"] or "global") if host else None
        prefix = parts.path[:match.start()] if match else parts.path
        self.root += prefix.rstrip("/")

    def root_for(self, location: str) -> str:
        """A Google endpoint follows the location; any other (a proxy, a mock) stays as it is."""
        if not self.google:
            return self.root
        return "https://aiplatform.googleapis.com" if location == "global" else f"https://{location}-aiplatform.googleapis.com"


# the native Gemini methods Vertex AI serves (embeddings use another API there: `predict`)
VERTEX_GEMINI_ENDPOINTS = frozenset({"gemini.generateContent", "gemini.streamGenerateContent", "gemini.countTokens"})


class _VertexGemini(GeminiGenerateContent):
    """Gemini translation; target.base_url is the location prefix, the headers come whole in extra_headers."""

    def url(self, target: Target, stream: bool) -> str:
        method = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
        return f"{target.base_url}/publishers/google/models/{_segment(target.model)}{method}"

    def request_headers(self, target: Target) -> dict[str, str]:
        return target.extra_headers or {}

    async def send(self, call: Call, target: Target) -> Reply:
        if call.client_format != "gemini":
            return await super().send(call, target)
        url = f"{target.base_url}/publishers/google/models/{_segment(target.model)}:{native_method(call)}"
        # a nested model would have to be Vertex's full resource name: leave it out (it is optional)
        return await send_native(self, call, target, url, self.request_headers(target),
                                 native_body(call.body, target.model, None))


class _VertexAnthropic(AnthropicMessages):
    native_version_header = False

    def native_url(self, call: Call, target: Target) -> str:
        if call.endpoint == "anthropic.count_tokens":  # one endpoint for every model, named in the body
            return f"{target.base_url}/publishers/anthropic/models/count-tokens:rawPredict"
        return self.url(target, call.stream)

    def native_body(self, call: Call, target: Target) -> dict[str, Any]:
        if call.endpoint == "anthropic.count_tokens":
            return {**call.body, "model": target.model}
        body = {k: v for k, v in call.body.items() if k != "model"}
        return {"anthropic_version": self.vertex_version, **body}

    def __init__(self, config: Provider, timeouts: Timeouts, upstream: UpstreamClient) -> None:
        version = config.api_version if (config.api_version or "").startswith("vertex-") else None
        super().__init__(msgspec.structs.replace(config, api_version=None), timeouts, upstream)
        self.vertex_version = version or VERTEX_ANTHROPIC_VERSION

    def url(self, target: Target, stream: bool = False) -> str:
        method = ":streamRawPredict" if stream else ":rawPredict"
        return f"{target.base_url}/publishers/anthropic/models/{_segment(target.model)}{method}"

    def request_headers(self, target: Target) -> dict[str, str]:
        return target.extra_headers or {}

    def request_body(self, call: Call, target: Target) -> dict[str, Any]:
        body = super().request_body(call, target)
        body.pop("model", None)
        return {"anthropic_version": self.vertex_version, **body}


class VertexAI:
    # native Anthropic: Claude models only; native Gemini: the other models
    endpoints = frozenset({"chat", "anthropic.messages", "anthropic.count_tokens", *VERTEX_GEMINI_ENDPOINTS})

    def __init__(self, config: Provider, timeouts: Timeouts, upstream: UpstreamClient) -> None:
        self.config = config
        self.timeouts = config.timeouts or timeouts
        self.upstream = upstream
        self.gemini = _VertexGemini(config, timeouts, upstream)
        self.anthropic = _VertexAnthropic(config, timeouts, upstream)
        self.tokens = TokenCache(upstream, self.timeouts.connect, self.timeouts.read)
        self._bases: dict[str, VertexBase] = {}
        self._accounts: dict[str, ServiceAccount] = {}
        self.account: ServiceAccount | None = None
        if config.api_key:
            try:
                self.account = self._account(config.api_key)
            except InvalidServiceAccount as exc:
                raise ConfigError(
                    f"provider {config.id!r}: api_key: expected the service-account JSON of a Google Cloud key "
                    f"file: {exc}") from None
        base = self.base(config.base_url)
        if not base.root.startswith(("http://", "https://")):
            raise ConfigError(f"provider {config.id!r}: base_url: expected https://<location>-aiplatform.googleapis.com")

    def base(self, base_url: str) -> VertexBase:
        return bounded_get(self._bases, base_url, VertexBase, _CACHE_LIMIT)

    def _account(self, value: Any) -> ServiceAccount:
        text = value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        return bounded_get(self._accounts, text, ServiceAccount.parse, _CACHE_LIMIT)

    def resolve(self, target: Target) -> tuple[ServiceAccount, str, dict[str, str]]:
        """(service account, location prefix URL, headers without Authorization) for one target."""
        fields = target.credentials if target.custom_credential and target.credentials else {}
        if target.custom_credential:
            raw = fields.get("vertex_ai_credentials") or target.api_key
            if raw is None:
                raise ValidationFailed("vertex_ai_credentials",
                                       "required for a Vertex AI credential: a service-account JSON object")
            try:
                account = self._account(raw)
            except InvalidServiceAccount as exc:
                raise ValidationFailed("vertex_ai_credentials", str(exc)) from None
            if self.tokens.upstream.egress is not None:
                self.tokens.upstream.egress.check_url(account.token_uri, TOKEN_URI_FIELD)
        elif target.api_key and target.api_key != self.config.api_key:  # a configured deployment's own key
            try:
                account = self._account(target.api_key)
            except InvalidServiceAccount as exc:
                raise UpstreamUnavailable(
                    f"Provider '{target.provider}': the api_key of deployment {target.deployment!r} is not a "
                    f"service-account JSON: {exc}") from None
        elif self.account is not None:
            account = self.account
        else:
            raise ValidationFailed("vertex_ai_credentials",
                                   f"provider '{target.provider}' has no service account configured (api_key)")
        base_url = target.base_url or self.config.base_url
        base = self.base(base_url)
        if target.custom_credential:  # the caller's own service account belongs to its own project
            project = fields.get("vertex_ai_project") or account.project_id or base.project
        else:
            project = base.project or account.project_id
        location = fields.get("vertex_ai_location") or base.location
        for name, value in (("vertex_ai_project", project), ("vertex_ai_location", location)):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise ValidationFailed(name, f"provider '{target.provider}' needs a Vertex AI "
                                             f"{name.rpartition('_')[2]} (letters, digits, '.', '_', '-')")
        root = base.root_for(location) if fields.get("vertex_ai_location") else base.root
        own_url = not target.custom_credential or base_url == self.config.base_url
        headers = {"Content-Type": "application/json", **(self.config.headers if own_url else {})}
        if target.extra_headers:
            headers.update(target.extra_headers)
        return account, f"{root}/v1/projects/{project}/locations/{location}", headers

    async def send(self, call: Call, target: Target) -> Reply:
        if call.client_format == "anthropic" and not is_claude(target.model):
            raise BadRequest(f"Provider '{target.provider}' serves Anthropic-format requests for Claude models only")
        if call.client_format == "gemini" and is_claude(target.model):
            raise BadRequest(f"Provider '{target.provider}' serves Gemini-format requests for Gemini models only")
        account, prefix, headers = self.resolve(target)
        token = await self.tokens.token(target.provider, account,
                                        TOKEN_URI_FIELD if target.custom_credential else None)
        headers["Authorization"] = f"Bearer {token}"
        inner = msgspec.structs.replace(target, base_url=prefix, api_key=None, extra_headers=headers)
        adapter = self.anthropic if is_claude(target.model) else self.gemini
        return await adapter.send(call, inner)

    async def close(self) -> None:
        return None
