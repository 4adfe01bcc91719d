"""/api/models/: custom models and aliases created, changed and deleted while the gateway runs (spec 2.5).

A custom model is either a new model on a provider (`provider_id`, called upstream by its
`model_name`) or an alias of another model (`base_model_name`, a catalog, config or custom model)
that inherits its provider, upstream name, prices and context window, overrides what it sets, and
is billed and logged under its own name. They live in the admin store (kind "model") and are
routable as soon as the write returns, on every worker at its next snapshot reload.

POST upserts by `model_name` (201 new, 200 updated). Models of the config file and of the built-in
catalog are read-only here (403); a custom model may take a catalog model's name to re-price or
re-route it. A body that would leave the model unservable (a missing base or provider, a cycle of
bases) is refused with 400 and nothing is stored.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.admin import AdminGuard, error_response, json_response, read_object
from proxy.admin.keys import InvalidField
from proxy.call import Target
from proxy.errors import ModelNotFound
from proxy.model_table import CustomModel, ModelTable
from proxy.store import StoredObject
from proxy.store.snapshot import Snapshot

KIND = "model"
COSTS = ("input_cost", "output_cost", "cache_hit_input_cost", "cache_creation_input_cost")
FLAGS = ("streaming_support", "function_call", "image_support")
FIELDS = {"model_name", "base_model_name", "display_name", "provider_id", "custom_provider_id",
          "max_context_window", "supported_params_override", "is_called_by_custom_name", *COSTS, *FLAGS}
LIST_FILTERS = {"model_name", "provider_id", "source", "base_model_name", "all", "page", "page_size"}
MAX_PAGE_SIZE = 100
READ_ONLY = "Cannot modify hardcoded models: {name!r} comes from the {source}; create a custom model instead"


def model_of(data: dict[str, Any]) -> CustomModel:
    return CustomModel(
        model_name=data["model_name"], base_model_name=data.get("base_model_name"),
        provider_id=data.get("provider_id"),
        called_by_custom_name=bool(data.get("is_called_by_custom_name")),
        input_cost=data.get("input_cost"), output_cost=data.get("output_cost"),
        cache_hit_input_cost=data.get("cache_hit_input_cost"),
        cache_creation_input_cost=data.get("cache_creation_input_cost"),
        max_context_window=data.get("max_context_window"),
    )


def stored_models(objects: dict[str, StoredObject]) -> list[CustomModel]:
    return [model_of(o.data) for o in objects.values()]


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 256 or any(c in value for c in "\r\n\0"):
        raise InvalidField(f"{field}: expected a model name of 1 to 256 characters")
    return value.strip()


def check_model(body: dict[str, Any], models: ModelTable, *, model_name: str | None,
                existing: dict[str, Any] | None) -> dict[str, Any]:
    """A create, PUT or PATCH body as stored data (`existing` set: PATCH merges into it)."""
    unknown = set(body) - FIELDS
    if unknown:
        raise InvalidField(f"{sorted(unknown)[0]}: unknown field; expected some of {', '.join(sorted(FIELDS))}")
    data = dict(existing or {})
    name = _name(body.get("model_name", model_name), "model_name")
    if model_name is not None and name != model_name:
        raise InvalidField(f"model_name: the path says {model_name!r}; rename by creating a new model")
    data["model_name"] = name
    if "base_model_name" in body:
        base = body["base_model_name"]
        data["base_model_name"] = None if base is None else _name(base, "base_model_name")
    for field in ("provider_id", "custom_provider_id"):
        if field in body:
            value = body[field]
            if value is None:
                data["provider_id"] = None
                continue
            found = models.provider_id(value) if isinstance(value, str) else None
            if found is None:
                raise InvalidField(f"{field}: no provider {value!r} on this gateway "
                                   f"(configured or custom: {', '.join(sorted(models.providers))})")
            data["provider_id"] = found
    if not data.get("base_model_name") and not data.get("provider_id"):
        raise InvalidField("provider_id: required for a model without base_model_name")
    if "display_name" in body:
        value = body["display_name"]
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            raise InvalidField("display_name: expected a string of at most 256 characters, or null")
        data["display_name"] = value
    for field in COSTS:
        if field in body:
            value = body[field]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value < 0):
                raise InvalidField(f"{field}: expected USD per 1M tokens (a number >= 0), or null")
            data[field] = value
    if "max_context_window" in body:
        value = body["max_context_window"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidField("max_context_window: expected a whole number of tokens >= 1, or null")
        data["max_context_window"] = value
    for field in FLAGS:
        if field in body:
            value = body[field]
            if value not in (0, 1) or value is None:
                raise InvalidField(f"{field}: expected 0 or 1")
            data[field] = int(value)
    if "is_called_by_custom_name" in body:
        if not isinstance(body["is_called_by_custom_name"], bool):
            raise InvalidField("is_called_by_custom_name: expected true or false")
        data["is_called_by_custom_name"] = body["is_called_by_custom_name"]
    if "supported_params_override" in body:
        value = body["supported_params_override"]
        if value is not None and not isinstance(value, dict):
            raise InvalidField("supported_params_override: expected an object, or null")
        merged = {**(data.get("supported_params_override") or {}), **(value or {})}  # partial merge
        data["supported_params_override"] = {k: v for k, v in merged.items() if v is not None} if value else None
    return data


class ModelsAPI:
    def __init__(self, snapshot: Snapshot, guard: AdminGuard, models: ModelTable) -> None:
        self.snapshot = snapshot
        self.guard = guard
        self.models = models

    def routes(self) -> list[Route]:
        guard = self.guard
        return [
            Route("/api/models/", guard(self.collection), methods=["GET", "POST"]),
            Route("/api/models/list/", guard(self.list_models), methods=["POST"]),
            Route("/api/models/summary/", guard(self.summary), methods=["GET", "POST"]),
            Route("/api/models/{model_name:path}/", guard(self.item), methods=["GET", "PUT", "PATCH", "DELETE"]),
        ]

    # -- views ---------------------------------------------------------------------------------

    def source(self, name: str) -> str | None:
        """"db" (custom), "config", "hardcoded" (the catalog) or None (not a model here)."""
        if name in self.models.custom:
            return "db"
        if name in self.models.config_names or name in self.models.aliases:
            return "config"
        try:
            self.models.resolve(name)
        except ModelNotFound:
            return None
        return "hardcoded"

    def describe(self, name: str, obj: StoredObject | None = None) -> dict[str, Any]:
        data = obj.data if obj is not None else {}
        source = "db" if obj is not None else self.source(name)
        target: Target | None
        try:
            target = self.models.resolve(name)
        except ModelNotFound:
            target = None
        prices = target.prices if target is not None else None
        provider = self.models.providers.get(target.provider) if target is not None else None
        out: dict[str, Any] = {
            "id": name, "model_name": name, "display_name": data.get("display_name") or name,
            "base_model_name": data.get("base_model_name"),
            "affiliation_category": "custom" if source == "db" else "respan",
            "is_called_by_custom_name": bool(data.get("is_called_by_custom_name")) or not data.get("base_model_name"),
            "source": source, "routable": target is not None,
            "upstream_model_name": target.model if target is not None else None,
            "input_cost": prices.input if prices else data.get("input_cost"),
            "output_cost": prices.output if prices else data.get("output_cost"),
            "cache_hit_input_cost": (prices.cached_input if prices else None) or data.get("cache_hit_input_cost"),
            "cache_creation_input_cost": (prices.cache_write if prices else None) or data.get("cache_creation_input_cost"),
            "max_context_window": target.context_window if target is not None else data.get("max_context_window"),
            **{flag: data.get(flag, 1) for flag in FLAGS},
            "supported_params_override": data.get("supported_params_override"),
            "provider": {"id": target.provider, "provider_id": target.provider,
                         "provider_name": provider.id if provider else target.provider,
                         "is_custom": target.provider in self.models.custom_providers} if target is not None else None,
            "created_at": _iso(obj.created_at) if obj else None, "updated_at": _iso(obj.updated_at) if obj else None,
        }
        if name in self.models.broken:
            out["error"] = self.models.broken[name]
        return out

    def _all_names(self) -> list[str]:
        names = dict.fromkeys(self.models.custom)
        names.update(dict.fromkeys(self.models.config_names))
        names.update(dict.fromkeys(self.models.aliases))
        names.update(dict.fromkeys(m["model_name"] for m in self.models.public_models()))
        return sorted(names)

    # -- handlers ------------------------------------------------------------------------------

    async def collection(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._write(request, None)
        return self._listing(dict(request.query_params))

    async def list_models(self, request: Request) -> Response:
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        return self._listing(body)

    def _listing(self, query: dict[str, Any]) -> Response:
        unknown = set(query) - LIST_FILTERS - {"sort_by"}
        if unknown:
            return error_response(f"{sorted(unknown)[0]}: unknown filter; expected some of "
                                  f"{', '.join(sorted(LIST_FILTERS))}", 400)
        try:
            page = _positive(query.get("page", 1), "page")
            page_size = _positive(query.get("page_size", 50), "page_size")
        except InvalidField as exc:
            return error_response(str(exc), 400)
        if page_size > MAX_PAGE_SIZE:
            return error_response(f"page_size: at most {MAX_PAGE_SIZE}", 400)
        everything = str(query.get("all", "")).lower() in ("true", "1")
        stored = self.snapshot.of(KIND)
        names = self._all_names() if everything or query.get("source") in ("config", "hardcoded") else sorted(stored)
        results = [self.describe(n, stored.get(n)) for n in names]
        for field in ("model_name", "base_model_name"):
            if query.get(field):
                wanted = str(query[field]).lower()
                results = [r for r in results if wanted in (r[field] or "").lower()]
        if query.get("provider_id"):
            results = [r for r in results if r["provider"] and r["provider"]["provider_id"] == query["provider_id"]]
        if query.get("source"):
            results = [r for r in results if r["source"] == query["source"]]
        start = (page - 1) * page_size
        return json_response({"count": len(results), "page": page, "page_size": page_size,
                              "results": results[start:start + page_size]})

    async def summary(self, request: Request) -> Response:
        names = self._all_names()
        stored = self.snapshot.of(KIND)
        by_source: dict[str, int] = {}
        for name in names:
            source = "db" if name in stored else self.source(name) or "unknown"
            by_source[source] = by_source.get(source, 0) + 1
        return json_response({"total": len(names), "custom": len(stored), "by_source": by_source,
                              "unroutable": sorted(self.models.broken)})

    async def item(self, request: Request) -> Response:
        name = request.path_params["model_name"]
        if request.method == "GET":
            obj = await self.snapshot.store.get(KIND, name)
            if obj is None and self.source(name) is None:
                return _not_found(name)
            return json_response(self.describe(name, obj))
        if name not in self.snapshot.of(KIND) and await self.snapshot.store.get(KIND, name) is None:
            source = self.source(name)
            if source is not None and request.method != "PUT":
                return json_response({"detail": READ_ONLY.format(name=name, source=_source_name(source))}, 403)
            if request.method != "PUT":
                return _not_found(name)
        if request.method == "DELETE":
            users = sorted(o.id for o in self.snapshot.of(KIND).values() if o.data.get("base_model_name") == name
                           and o.id != name)
            if users:
                return error_response(f"Model {name!r} is the base of custom models {', '.join(users)}: delete them "
                                      "or change their base_model_name first", 409, models=users)
            deleted = await self.snapshot.delete(KIND, name)
            return Response(status_code=204) if deleted else _not_found(name)
        return await self._write(request, name)

    async def _write(self, request: Request, name: str | None) -> Response:
        """POST (upsert), PUT (replace) or PATCH (merge) of one custom model."""
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        model_name = name if name is not None else body.get("model_name")
        if isinstance(model_name, str) and model_name in self.models.config_names | set(self.models.aliases):
            return json_response({"detail": READ_ONLY.format(name=model_name, source="config file")}, 403)

        def change(existing: dict[str, Any] | None) -> dict[str, Any]:
            data = check_model(body, self.models, model_name=name, existing=existing)
            why = self.models.why_unservable(model_of(data))
            if why is not None:
                base = data.get("base_model_name")
                if base and why == ModelNotFound(base).detail:
                    raise InvalidField(f"base_model_name: Base model not found: {base!r} is not a model on this "
                                       "gateway")
                raise InvalidField(f"model_name: {why}")
            return data

        try:
            if request.method == "PATCH":
                assert name is not None
                obj = await self.snapshot.update(KIND, name, change)
                if obj is None:
                    return _not_found(name)
                return json_response(self.describe(obj.id, obj))
            data = change(None)
        except InvalidField as exc:
            message = str(exc)
            if message.startswith("base_model_name: Base model not found"):
                return json_response({"error": "Base model not found", "detail": message}, 400)
            return error_response(message, 400)
        existed = await self.snapshot.store.get(KIND, data["model_name"]) is not None
        obj = await self.snapshot.put(KIND, data["model_name"], data)
        return json_response(self.describe(obj.id, obj), 200 if existed else 201)


def _positive(value: Any, field: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidField(f"{field}: expected a whole number >= 1") from None
    if number < 1:
        raise InvalidField(f"{field}: expected a whole number >= 1")
    return number


def _source_name(source: str) -> str:
    return {"config": "config file", "hardcoded": "built-in catalog"}.get(source, source)


def _not_found(name: str) -> Response:
    return error_response(f"Model {name!r} not found", 404)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()
