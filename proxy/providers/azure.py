"""Azure OpenAI: the OpenAI Chat Completions API behind per-deployment URLs.

Azure speaks the OpenAI chat body and SSE stream, and its errors are already OpenAI-shaped, so
this adapter is OpenAICompatible with two things changed:

URL
    `{base_url}/openai/deployments/{deployment}/chat/completions?api-version={api_version}`.
    * `deployment` is the Target's upstream model: the `<deployment>` of an `azure/<deployment>`
      slug, or a configured model's `model`. It is percent-encoded as one path segment.
    * `base_url` is the Target's (a credential's `api_base` / `base_url` / `endpoint`), else the
      provider's: the resource endpoint, `https://<resource>.openai.azure.com`. A trailing
      `/openai` is accepted too.
    * `api_version`: the credential's `api_version` (credential_override, customer_credentials,
      a load-balance entry), else an `api-version` in a full deployment URL (below), else the
      provider's configured `api_version`, else DEFAULT_API_VERSION (the current GA inference
      version). It must look like a version (letters, digits, `.`, `_`, `-`): a request-supplied
      one that does not is answered 422.
    * A base URL that already contains `/openai/deployments/` is a full deployment URL: it is
      used as it is (with `/chat/completions` appended unless present), so its deployment wins
      over the Target's model; its own query is kept, `api-version` set as above.
    * An embeddings Call (`call.endpoint == "embeddings"`) uses the same URLs with `/embeddings`
      in place of `/chat/completions`.
    * A Responses API Call (`call.endpoint == "responses"`) has no deployment in its URL (the
      deployment travels as the body's `model`): `{base_url}/openai/responses?api-version=...`
      (the resource root of a full deployment URL), or `{base_url}/openai/v1/responses` with the
      v1 API. The dated Responses API needs 2025-03-01-preview or later: without a configured
      or requested version it uses RESPONSES_API_VERSION (not DEFAULT_API_VERSION).
    * `api_version: v1`, or a base URL ending in `/openai/v1`, selects Azure's v1 API:
      `{base_url}/openai/v1/chat/completions` without an api-version query; the deployment name
      travels as the body's `model` (which is always sent, and which the dated API ignores).

Auth
    `api-key: <key>` instead of `Authorization: Bearer`. For Microsoft Entra ID, a request
    credential may carry `azure_ad_token` instead of `api_key`: it is sent as
    `Authorization: Bearer <token>` (an `api_key` in the same credential wins). A provider can
    also send a static Entra token with `headers: {Authorization: "Bearer ..."}` and no api_key.
    Configured headers never go to a base URL chosen by the caller (as for every OpenAI adapter).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlencode

from proxy.call import Call, Target
from proxy.errors import ValidationFailed
from proxy.providers.common import bounded_get
from proxy.providers.openai_compatible import OpenAICompatible
from proxy.settings import ConfigError, Provider, Timeouts
from proxy.upstream import UpstreamClient

DEFAULT_API_VERSION = "2024-10-21"  # the GA data-plane inference version
RESPONSES_API_VERSION = "2025-04-01-preview"  # the dated Responses API is preview-only
V1 = "v1"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEPLOYMENTS = "/openai/deployments/"
CHAT = "/chat/completions"
EMBEDDINGS = "/embeddings"
_HEADER_UNSAFE = ("\r", "\n", "\0")
_CACHE_LIMIT = 10_000


class BaseURL:
    """A configured or credential base URL, taken apart once."""

    __slots__ = ("root", "full", "v1", "query", "version")

    def __init__(self, base_url: str) -> None:
        url, _, query = base_url.partition("?")
        url = url.rstrip("/")
        params = parse_qsl(query, keep_blank_values=True)
        self.version = next((v for k, v in params if k == "api-version"), None) or None
        self.query = [(k, v) for k, v in params if k != "api-version"]
        self.full = _DEPLOYMENTS in url + "/"
        self.v1 = not self.full and url.endswith("/openai/v1")
        if self.full:
            url = url.removesuffix(EMBEDDINGS)  # a full embeddings URL serves chat too, and back
            self.root = url if url.endswith(CHAT) else url + CHAT
        elif self.v1:
            self.root = url.removesuffix("/openai/v1")
        else:
            self.root = url.removesuffix("/openai")


def valid_version(value: object) -> bool:
    return isinstance(value, str) and _VERSION.fullmatch(value) is not None


def chat_url(base: BaseURL, deployment: str, api_version: str, path: str = CHAT) -> str:
    """The chat completions (or, with path EMBEDDINGS, embeddings) URL for one deployment
    (api_version already resolved)."""
    if base.full:
        query = urlencode([*base.query, ("api-version", api_version)]) if api_version != V1 else urlencode(base.query)
        root = base.root if path == CHAT else base.root.removesuffix(CHAT) + path
        return f"{root}?{query}" if query else root
    if base.v1 or api_version == V1:
        return f"{base.root}/openai/v1{path}"
    return f"{base.root}/openai/deployments/{quote(deployment, safe='')}{path}?api-version={api_version}"


def responses_url(base: BaseURL, api_version: str) -> str:
    """The Responses API URL (no deployment segment; api_version already resolved)."""
    root = base.root.split(_DEPLOYMENTS, 1)[0] if base.full else base.root
    if base.v1 or api_version == V1:
        return f"{root}/openai/v1/responses"
    query = urlencode([*base.query, ("api-version", api_version)]) if base.full else f"api-version={api_version}"
    return f"{root}/openai/responses?{query}"


class AzureOpenAI(OpenAICompatible):
    endpoints = frozenset({"chat", "embeddings", "responses"})

    def __init__(self, config: Provider, timeouts: Timeouts, upstream: UpstreamClient) -> None:
        super().__init__(config, timeouts, upstream)
        if config.api_version is not None and not valid_version(config.api_version):
            raise ConfigError(
                f"provider {config.id!r}: api_version: expected an Azure API version such as "
                f"{DEFAULT_API_VERSION!r} or 'v1', got {config.api_version!r}"
            )
        self._bases: dict[str, BaseURL] = {}
        self._urls: dict[tuple[str, str, str | None, str], str] = {}

    def base(self, base_url: str) -> BaseURL:
        return bounded_get(self._bases, base_url, BaseURL, _CACHE_LIMIT)

    def url(self, call: Call, target: Target) -> str:
        base_url = target.base_url or self.config.base_url
        requested = target.credentials.get("api_version") if target.credentials else None
        if requested is not None and not valid_version(requested):
            raise ValidationFailed("api_version", f"expected an Azure API version such as {DEFAULT_API_VERSION!r} or 'v1'")
        key = (base_url, target.model, requested, call.endpoint)
        url = self._urls.get(key)
        if url is None:
            base = self.base(base_url)
            default = RESPONSES_API_VERSION if call.endpoint == "responses" else DEFAULT_API_VERSION
            version = requested or base.version or self.config.api_version or default
            if not valid_version(version):  # from a full deployment URL's query
                version = self.config.api_version or default
            if call.endpoint == "responses":
                url = responses_url(base, version)
            else:
                url = chat_url(base, target.model, version, EMBEDDINGS if call.endpoint == "embeddings" else CHAT)
            if len(self._urls) >= _CACHE_LIMIT:
                self._urls.clear()
            self._urls[key] = url
        return url

    def auth_headers(self, api_key: str) -> dict[str, str]:
        return {"api-key": api_key}

    def request_headers(self, target: Target) -> dict[str, str]:
        headers = super().request_headers(target)
        if target.custom_credential and target.api_key is None and target.credentials:
            token = target.credentials.get("azure_ad_token")
            if token is not None:
                if not isinstance(token, str) or not token.strip() or any(c in token for c in _HEADER_UNSAFE):
                    raise ValidationFailed("azure_ad_token", "expected a non-empty string without line breaks")
                headers = {**headers, "Authorization": f"Bearer {token}"}
        return headers
