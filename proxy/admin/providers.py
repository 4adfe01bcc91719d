"""/api/providers/: custom providers created, changed and deleted while the gateway runs (spec 2.5).

A custom provider is an endpoint with a base URL and a key: OpenAI-compatible by default (a vLLM,
an Ollama, a company proxy), or one of the native protocols below. They live in the admin store
(kind "provider") and are routable as soon as the write returns: custom models point at them, and
`provider_id/model` slugs and `X-Respan-Route-Provider` reach them.

`api_key` is write-only: the API says whether one is set, never what it is. Header values in
`extra_kwargs.headers` may be secrets too and are shown as "<hidden>". Providers of the config file
are listed as managed (`is_managed: true`) and cannot be changed or deleted here (403).

POST on an existing provider_id updates it (200), as the older docs describe; a new one is 201.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.admin import AdminGuard, error_response, json_response, read_object
from proxy.admin.keys import InvalidField
from proxy.catalog import load_catalog
from proxy.egress import EgressPolicy, header_reason
from proxy.settings import ConfigError, Provider, Settings, Timeouts, check_base_url
from proxy.store import StoredObject
from proxy.store.snapshot import Snapshot

KIND = "provider"
PROTOCOLS = ("openai", "anthropic", "gemini", "azure")  # protocols served with a base_url and an api_key
PROVIDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
FIELDS = {"provider_id", "provider_name", "api_key", "extra_kwargs"}
KWARGS = {"base_url", "timeout", "headers", "protocol", "api_version"}
DEFAULT_PARAMS = {  # extra_kwargs keys sent as request params when a request leaves them out
    "temperature", "max_tokens", "max_completion_tokens", "top_p", "frequency_penalty", "presence_penalty",
    "seed", "stop",
}
HIDDEN = "<hidden>"
UNSAFE = "\r\n\0"


def provider_of(data: dict[str, Any]) -> Provider:
    """A stored custom provider as the gateway's Provider config."""
    kwargs = data.get("extra_kwargs") or {}
    timeout = kwargs.get("timeout")
    return Provider(
        id=data["provider_id"],
        protocol=kwargs.get("protocol") or "openai",
        base_url=kwargs["base_url"],
        api_key=data.get("api_key"),
        api_version=kwargs.get("api_version"),
        headers=dict(kwargs.get("headers") or {}),
        timeouts=Timeouts(read=float(timeout)) if timeout else None,
        defaults={k: v for k, v in kwargs.items() if k in DEFAULT_PARAMS},
    )


def stored_providers(objects: dict[str, StoredObject]) -> list[Provider]:
    return [provider_of(o.data) for o in objects.values()]


def _check_kwargs(value: Any, provider_id: str, egress: EgressPolicy | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidField("extra_kwargs: expected an object with at least base_url")
    unknown = set(value) - KWARGS - DEFAULT_PARAMS
    if unknown:
        raise InvalidField(f"extra_kwargs.{sorted(unknown)[0]}: unknown key; expected some of "
                           f"{', '.join(sorted(KWARGS | DEFAULT_PARAMS))}")
    out = dict(value)
    spec = load_catalog().providers.get(provider_id)
    protocol = out.get("protocol")
    if protocol is None:
        protocol = spec.protocol if spec is not None and spec.protocol in PROTOCOLS else "openai"
    if protocol not in PROTOCOLS:
        raise InvalidField(f"extra_kwargs.protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    out["protocol"] = protocol
    if not out.get("base_url") and spec is not None and spec.base_url:
        out["base_url"] = spec.base_url  # a catalog provider (groq, mistral, ...) may leave it out
    base_url = out.get("base_url")
    if not isinstance(base_url, str) or not base_url:
        raise InvalidField("extra_kwargs.base_url: required, an http:// or https:// URL")
    try:
        check_base_url(base_url, "extra_kwargs.base_url")
    except ConfigError as exc:
        raise InvalidField(str(exc)) from None
    # a provider made at run time is not the operator's config: the egress policy applies (and again
    # at every connection, to the addresses its host resolves to)
    reason = (egress or EgressPolicy()).url_reason(base_url)
    if reason is not None:
        raise InvalidField(f"extra_kwargs.base_url: {reason}")
    timeout = out.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not math.isfinite(timeout) or timeout <= 0):
        raise InvalidField("extra_kwargs.timeout: expected seconds (a number > 0)")
    headers = out.get("headers")
    if headers is not None:
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise InvalidField("extra_kwargs.headers: expected an object of header names to string values")
        for name, header_value in headers.items():
            reason = header_reason(name, header_value)
            if reason is not None:
                shown = "".join(c if " " < c < "\x7f" else "?" for c in name)[:100]
                raise InvalidField(f"extra_kwargs.headers.{shown}: {reason}")
    if protocol == "azure" and not out.get("api_version"):
        raise InvalidField("extra_kwargs.api_version: required for an azure provider")
    if out.get("api_version") is not None and not isinstance(out["api_version"], str):
        raise InvalidField("extra_kwargs.api_version: expected a string")
    return out


def check_provider(body: dict[str, Any], *, provider_id: str | None, existing: dict[str, Any] | None,
                   egress: EgressPolicy | None = None) -> dict[str, Any]:
    """A create, PUT or PATCH body as stored data (`existing` set: PATCH merges into it)."""
    unknown = set(body) - FIELDS
    if unknown:
        raise InvalidField(f"{sorted(unknown)[0]}: unknown field; expected some of {', '.join(sorted(FIELDS))}")
    data = dict(existing or {})
    given_id = body.get("provider_id", provider_id)
    if provider_id is not None and given_id != provider_id:
        raise InvalidField(f"provider_id: the path says {provider_id!r}; a provider's id cannot change")
    if not isinstance(given_id, str) or not PROVIDER_ID.match(given_id):
        raise InvalidField("provider_id: required, 1 to 100 letters, digits, '_', '.' or '-'")
    data["provider_id"] = given_id
    if "provider_name" in body or existing is None:
        name = body.get("provider_name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise InvalidField("provider_name: required, a string of 1 to 200 characters")
        data["provider_name"] = name.strip()
    if "api_key" in body:
        key = body["api_key"]
        if key is not None and (not isinstance(key, str) or not key.strip() or any(c in key for c in UNSAFE)):
            raise InvalidField("api_key: expected a non-empty string without line breaks, or null")
        data["api_key"] = key
    if "extra_kwargs" in body or existing is None:
        kwargs = body.get("extra_kwargs")
        if existing is not None and isinstance(kwargs, dict):  # PATCH: keys merge; null removes one
            kwargs = {k: v for k, v in {**(existing.get("extra_kwargs") or {}), **kwargs}.items() if v is not None}
        data["extra_kwargs"] = _check_kwargs(kwargs, given_id, egress)
    return data


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def view(obj: StoredObject) -> dict[str, Any]:
    """A custom provider as the API shows it: never its key, never a header value."""
    data = obj.data
    kwargs = dict(data.get("extra_kwargs") or {})
    if kwargs.get("headers"):
        kwargs["headers"] = dict.fromkeys(kwargs["headers"], HIDDEN)
    return {"id": obj.id, "provider_id": obj.id, "provider_name": data["provider_name"], "extra_kwargs": kwargs,
            "has_api_key": bool(data.get("api_key")), "is_managed": False, "source": "db",
            "created_at": _iso(obj.created_at), "updated_at": _iso(obj.updated_at)}


def config_view(provider: Provider) -> dict[str, Any]:
    """A provider of the config file: read-only here."""
    spec = load_catalog().providers.get(provider.id)
    return {"id": provider.id, "provider_id": provider.id, "provider_name": spec.name if spec else provider.id,
            "extra_kwargs": {"base_url": provider.base_url, "protocol": provider.protocol},
            "has_api_key": bool(provider.api_key or any(d.api_key for d in provider.deployments)),
            "is_managed": True, "source": "config", "created_at": None, "updated_at": None}


class ProvidersAPI:
    def __init__(self, snapshot: Snapshot, guard: AdminGuard, settings: Settings) -> None:
        self.snapshot = snapshot
        self.guard = guard
        self.settings = settings
        self.egress = EgressPolicy(settings.egress.allow, settings.egress.deny)

    def routes(self) -> list[Route]:
        guard = self.guard
        return [
            Route("/api/providers/", guard(self.collection), methods=["GET", "POST"]),
            Route("/api/providers/{provider_id}/", guard(self.item), methods=["GET", "PUT", "PATCH", "DELETE"]),
        ]

    async def collection(self, request: Request) -> Response:
        if request.method == "GET":
            custom = sorted(self.snapshot.of(KIND).values(), key=lambda o: o.id)
            results = [*(config_view(p) for p in self.settings.providers), *(view(o) for o in custom)]
            return json_response({"count": len(results), "results": results})
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        given = body.get("provider_id")
        if isinstance(given, str) and self.settings.provider(given) is not None:
            return _managed(given, "modify")
        try:
            data = check_provider(body, provider_id=None, existing=None, egress=self.egress)
        except InvalidField as exc:
            return error_response(str(exc), 400)
        existed = await self.snapshot.store.get(KIND, data["provider_id"]) is not None
        obj = await self.snapshot.put(KIND, data["provider_id"], data)
        return json_response(view(obj), 200 if existed else 201)

    async def item(self, request: Request) -> Response:
        provider_id = request.path_params["provider_id"]
        configured = self.settings.provider(provider_id)
        if configured is not None:
            if request.method == "GET":
                return json_response(config_view(configured))
            return _managed(provider_id, "delete" if request.method == "DELETE" else "modify")
        if request.method == "GET":
            current = await self.snapshot.store.get(KIND, provider_id)
            return json_response(view(current)) if current is not None else _not_found(provider_id)
        if request.method == "DELETE":
            users = sorted(o.id for o in self.snapshot.of("model").values()
                           if o.data.get("provider_id") == provider_id)
            if users:
                return error_response(f"Provider {provider_id!r} is used by custom models {', '.join(users)}: "
                                      "delete them or point them at another provider first", 409, models=users)
            deleted = await self.snapshot.delete(KIND, provider_id)
            return Response(status_code=204) if deleted else _not_found(provider_id)
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        try:
            if request.method == "PATCH":
                obj = await self.snapshot.update(
                    KIND, provider_id, lambda data: check_provider(body, provider_id=provider_id, existing=data,
                                                                      egress=self.egress))
                return json_response(view(obj)) if obj is not None else _not_found(provider_id)
            data = check_provider(body, provider_id=provider_id, existing=None, egress=self.egress)  # PUT: the whole provider
        except InvalidField as exc:
            return error_response(str(exc), 400)
        current = await self.snapshot.store.get(KIND, provider_id)
        if current is not None and "api_key" not in body:
            data["api_key"] = current.data.get("api_key")  # a PUT that leaves the key out keeps it
        obj = await self.snapshot.put(KIND, provider_id, data)
        return json_response(view(obj), 200 if current is not None else 201)


def _not_found(provider_id: str) -> Response:
    return error_response(f"Provider {provider_id!r} not found", 404)


def _managed(provider_id: str, action: str) -> Response:
    message = f"Cannot {action} managed provider {provider_id!r}: it comes from the config file"
    return json_response({"error": message, "detail": message}, 403)
