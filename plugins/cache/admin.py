"""Cache management (spec 2.7), behind the admin key.

- `POST /api/caches/`: list entries, newest first (`page`, `page_size` <= 1000; filters
  `model`, `customer_identifier`, `endpoint`); content is never shown.
- `POST /api/caches/summary/`: entry count, bytes, and counts by model and endpoint.
- `GET /api/cache/{id}/`: one entry's summary (404 when absent or expired).
- `DELETE /api/caches/bulk/`: exactly one of `cache_keys` (list), `ids` (list; the same ids)
  or `all: true`; answers `{"deleted": N}`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugins.cache.store import CacheStore
from proxy.admin import AdminGuard, error_response, json_response, read_object

MAX_PAGE_SIZE = 1000
FILTERS = {"model": "model", "customer_identifier": "customer", "endpoint": "endpoint"}


def admin_routes(store: CacheStore, guard: AdminGuard) -> list[Route]:
    async def list_entries(request: Request) -> Response:
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        page, page_size = body.get("page", 1), body.get("page_size", 100)
        for name, value, top in (("page", page, None), ("page_size", page_size, MAX_PAGE_SIZE)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (top and value > top):
                limit = f" and at most {top}" if top else ""
                return error_response(f"{name}: expected an integer of at least 1{limit}, got {value!r}", 400)
        wanted = {attr: body[name] for name, attr in FILTERS.items() if body.get(name) is not None}
        rows = [entry.summary(key) async for key, entry in store.entries()
                if all(getattr(entry, attr) == value for attr, value in wanted.items())]
        rows.sort(key=lambda row: row["created_at"], reverse=True)
        start = (page - 1) * page_size
        return json_response({"count": len(rows), "page": page, "page_size": page_size,
                              "results": rows[start:start + page_size]})

    async def summary(request: Request) -> Response:
        count = size = 0
        by_model: Counter[str] = Counter()
        by_endpoint: Counter[str] = Counter()
        async for _, entry in store.entries():
            count += 1
            size += len(entry.body)
            by_model[entry.model] += 1
            by_endpoint[entry.endpoint] += 1
        return json_response({"number_of_entries": count, "total_size_bytes": size,
                              "by_model": dict(by_model), "by_endpoint": dict(by_endpoint),
                              "backend": store.backend})

    async def detail(request: Request) -> Response:
        key = request.path_params["id"]
        entry = await store.get(key)
        if entry is None:
            return error_response(f"No cache entry with id {key!r}", 404)
        return json_response(entry.summary(key))

    async def bulk_delete(request: Request) -> Response:
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        given = [name for name in ("cache_keys", "ids", "all") if body.get(name) not in (None, False)]
        if len(given) != 1:
            return error_response("Give exactly one of cache_keys, ids or all", 400)
        if given[0] == "all":
            if body["all"] is not True:
                return error_response("all: expected true", 400)
            return json_response({"deleted": await store.clear()})
        keys: Any = body[given[0]]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return error_response(f"{given[0]}: expected a list of cache ids", 400)
        deleted = 0
        for key in keys:
            deleted += await store.delete(key)
        return json_response({"deleted": deleted})

    return [
        Route("/api/caches/", guard(list_entries), methods=["POST"]),
        Route("/api/caches/summary/", guard(summary), methods=["POST", "GET"]),
        Route("/api/cache/{id}/", guard(detail), methods=["GET"]),
        Route("/api/caches/bulk/", guard(bulk_delete), methods=["DELETE"]),
    ]
