"""The log plane's HTTP API (spec 2.3, 2.4, 2.7 users, 6.3).

Ingestion (`/api/request-logs/`, `/create/`, the traces ingests) takes a gateway key or an admin
key: ingested logs go through the same LogQueue as the gateway's own, so they share the sinks,
the spool and the schema. Everything that reads or edits logs takes an admin key only: logs hold
every prompt and answer, and a gateway key sits in every client.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.admin import AdminGuard, error_response, json_response, read_json
from proxy.call import KeyInfo
from proxy.errors import INVALID_KEY
from proxy.keys import KeyRing, presented_key
from proxy.logs import sql
from proxy.logs.ingest import IngestError, PriceLookup, create_response, spans_of, to_record
from proxy.logs.query import LogQuery, QueryError, condition, parse_query
from proxy.logs.queue import LogQueue
from proxy.logs.schema import api_view, iso
from proxy.logs.stores import EDITABLE, LogStore
from proxy.metrics import Metrics

logger = logging.getLogger("llmrelay.logs")
MAX_INGEST_BYTES = 20 * 1024 * 1024  # spec 2.3: 20 MB per payload
NO_STORE = "No queryable log sink is configured: add a sqlite or postgres sink under logs.sinks"
NOT_FOUND = "Not found."
USERS_WINDOW = 30 * 86400.0  # the users API's default period: the last 30 days
BUCKETS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)  # dashboard time-bucket sizes, seconds
ADMIN_KEY = KeyInfo(name="admin", environment="production")


class LogsAPI:
    def __init__(self, queue: LogQueue, store: LogStore | None, guard: AdminGuard, keys: KeyRing,
                 prices: PriceLookup, metrics: Metrics,
                 customer_settings: Callable[[str], dict[str, Any] | None] = lambda _: None) -> None:
        self.queue = queue
        self.customer_settings = customer_settings  # a customer's stored budgets, name, ... (or None)
        self.store = store
        self.guard = guard
        self.keys = keys
        self.prices = prices
        self.metrics = metrics

    def routes(self) -> list[Route]:
        guard = self.guard

        def admin(handler: Handler) -> Handler:
            return guard(_store_errors(handler))

        ingest_one = self.ingest_logs
        return [
            Route("/api/request-logs/", ingest_one, methods=["POST"]),
            Route("/api/request-logs/create/", ingest_one, methods=["POST"]),
            Route("/api/request-logs/create", ingest_one, methods=["POST"]),
            Route("/api/v1/traces/ingest", self.traces_ingest, methods=["POST"]),
            Route("/api/v1/traces/ingest/", self.traces_ingest, methods=["POST"]),
            Route("/api/traces/ingest/", self.traces_ingest_legacy, methods=["POST"]),
            Route("/api/traces/ingest", self.traces_ingest_legacy, methods=["POST"]),
            Route("/api/request-logs/list/", admin(self.list_logs), methods=["GET", "POST"]),
            Route("/api/request-logs/summary/", admin(self.summary), methods=["GET", "POST"]),
            Route("/api/request-logs/batch-update/", admin(self.batch_update), methods=["PATCH"]),
            Route("/api/request-logs/{unique_id}/", admin(self.log_detail), methods=["GET", "PATCH"]),
            Route("/api/users/", admin(self.list_users), methods=["GET"]),
            Route("/api/users/list/", admin(self.list_users), methods=["GET", "POST"]),
            Route("/api/users/{customer_identifier}/", admin(self.user_detail), methods=["GET"]),
            Route("/api/dashboard/stats/", admin(self.stats), methods=["GET", "POST"]),
        ]

    # -- ingestion --------------------------------------------------------------------------

    def _who(self, request: Request) -> KeyInfo | Response:
        key = presented_key(request.headers)
        if key is None:
            return error_response(INVALID_KEY, 401)
        info = self.keys.identify(key)
        if info is not None:
            return info
        if self.guard.is_admin(key):
            return ADMIN_KEY
        return error_response(INVALID_KEY, 401)

    async def _ingest(self, request: Request, read: Callable[[Any], list[tuple[str, Any]]], method: str,
                      endpoint: str) -> tuple[list[Any], Response | None]:
        """Authenticate, read, normalize every payload, then queue them all (blocking until they
        are written when asked). Returns the records, or the error to answer (nothing queued)."""
        who = self._who(request)
        if isinstance(who, Response):
            return [], who
        body, refused = await read_json(request, MAX_INGEST_BYTES)
        if refused is not None:
            return [], refused
        block = True
        if isinstance(body, dict):
            controls = body.pop("respan_api_controls", None) or body.pop("keywordsai_api_controls", None)
            if controls is not None:
                if not isinstance(controls, dict) or not isinstance(controls.get("block", True), bool):
                    return [], error_response("respan_api_controls: expected {\"block\": true|false}", 400)
                block = controls.get("block", True)
        now = time.time()
        try:
            records = [to_record(p, who, self.prices, where=where, log_method=method, now=now) for where, p in read(body)]
        except IngestError as exc:
            return [], error_response(str(exc), 400)
        if block:
            await self.queue.put_and_wait(records)
        else:
            for record in records:
                self.queue.put(record)
        self.metrics.logs_ingested.labels(endpoint).inc(len(records))
        return records, None

    async def ingest_logs(self, request: Request) -> Response:
        """POST /api/request-logs/ (and /create/): one log object, or an array of them."""
        is_batch: list[bool] = []

        def read(body: Any) -> list[tuple[str, Any]]:
            if isinstance(body, list):
                is_batch.append(True)
                return [(f"[{i}].", p) for i, p in enumerate(spans_of(body))]
            return [("", body)]

        records, refused = await self._ingest(request, read, "logging_api", "request-logs")
        if refused is not None:
            return refused
        if is_batch:
            return json_response([create_response(r) for r in records], 201)
        return json_response(create_response(records[0]), 201)

    async def traces_ingest(self, request: Request) -> Response:
        """POST /api/v1/traces/ingest: an array of spans (or {"data": [...]})."""
        records, refused = await self._ingest(request, _spans, "tracing_integration", "traces")
        if refused is not None:
            return refused
        traces = sorted({r.trace_unique_id for r in records if r.trace_unique_id})
        return json_response({"status": "ok", "ingested_spans": len(records), "created_traces": len(traces),
                              "trace_ids": traces, "errors": []}, 200)

    async def traces_ingest_legacy(self, request: Request) -> Response:
        """POST /api/traces/ingest/: the older variant, same body."""
        records, refused = await self._ingest(request, _spans, "tracing_integration", "traces")
        if refused is not None:
            return refused
        return json_response({"success": True, "ingested_count": len(records)}, 200)

    # -- queries ----------------------------------------------------------------------------

    async def _query(self, request: Request, **options: Any) -> tuple[LogQuery | None, Response | None]:
        if self.store is None:
            return None, error_response(NO_STORE, 501)
        body: Any = {}
        if request.method == "POST":
            body, refused = await read_json(request)
            if refused is not None:
                return None, refused
            if not isinstance(body, dict):
                return None, error_response("Expected a JSON object with 'filters'", 400)
        try:
            return parse_query(request.query_params, body, **options), None
        except QueryError as exc:
            return None, error_response(str(exc), 400)

    async def list_logs(self, request: Request) -> Response:
        query, refused = await self._query(request)
        if refused is not None:
            return refused
        assert query is not None and self.store is not None
        count, rows = await self.store.list(query)
        results = [api_view(r, query.include) for r in rows]
        return json_response(_page(request, query, count, results))

    async def summary(self, request: Request) -> Response:
        query, refused = await self._query(request)
        if refused is not None:
            return refused
        assert query is not None and self.store is not None
        return json_response(await self.store.summary(query))

    async def log_detail(self, request: Request) -> Response:
        if self.store is None:
            return error_response(NO_STORE, 501)
        unique_id = request.path_params["unique_id"]
        if request.method == "PATCH":
            body, refused = await read_json(request)
            if refused is not None:
                return refused
            try:
                changes = _edits(body, "")
            except IngestError as exc:
                return error_response(str(exc), 400)
            if await self.store.update([(unique_id, changes)]):
                return error_response(NOT_FOUND, 404)
        row = await self.store.get(unique_id)
        if row is None:
            return error_response(NOT_FOUND, 404)
        view = api_view(row)
        view["limit_info"] = _limit_info(row.get("limit_info"))
        return json_response(view)

    async def batch_update(self, request: Request) -> Response:
        if self.store is None:
            return error_response(NO_STORE, 501)
        body, refused = await read_json(request)
        if refused is not None:
            return refused
        logs = body.get("logs") if isinstance(body, dict) else None
        if not isinstance(logs, list) or not logs:
            return error_response("logs: expected a non-empty array of {unique_id, ...}", 400)
        changes: list[tuple[str, dict[str, Any]]] = []
        try:
            for i, item in enumerate(logs):
                if not isinstance(item, dict) or not isinstance(item.get("unique_id"), str):
                    raise IngestError(f"logs[{i}].unique_id: required (a string)")
                fields = {k: v for k, v in item.items() if k != "unique_id"}
                changes.append((item["unique_id"], _edits(fields, f"logs[{i}].")))
        except IngestError as exc:
            return error_response(str(exc), 400)
        missing = await self.store.update(changes)
        if missing:
            return error_response(f"Not found: {', '.join(missing[:20])}; nothing was updated", 404, missing=missing)
        return json_response({"updated": len(changes)})

    # -- customers --------------------------------------------------------------------------

    async def list_users(self, request: Request) -> Response:
        query, refused = await self._query(request, default_window=USERS_WINDOW)
        if refused is not None:
            return refused
        assert query is not None and self.store is not None
        query.all_of.append(condition("customer_identifier", "isnull", [False], where="customer_identifier"))
        order = {"cost": "total_cost", "requests": "number_of_requests", "tokens": "total_tokens",
                 "last_seen": "last_seen"}.get(query.sort_column, "total_cost")
        offset = (query.page - 1) * query.page_size
        groups = await self.store.groups(query, "customer_identifier", limit=query.page_size, offset=offset,
                                         order=f"{order} {'DESC' if query.descending else 'ASC'}, grp ASC")
        count = await self.store.count_groups(query, "customer_identifier")
        results = [{**(self.customer_settings(g["group"]) or {}), **_customer(g, query)} for g in groups]
        return json_response(_page(request, query, count, results))

    async def user_detail(self, request: Request) -> Response:
        query, refused = await self._query(request, default_window=USERS_WINDOW)
        if refused is not None:
            return refused
        assert query is not None and self.store is not None
        customer = request.path_params["customer_identifier"]
        query.all_of.append(condition("customer_identifier", "", customer, where="customer_identifier"))
        ever = LogQuery(all_of=list(query.all_of))
        settings = self.customer_settings(customer)
        if settings is None and not (await self.store.summary(ever))["number_of_requests"]:
            return error_response(NOT_FOUND, 404)
        summary = await self.store.summary(query)
        days = await self.store.groups(query, sql.bucket_expr(self.store.dialect, 86400), limit=400,
                                       order="grp ASC")
        models = await self.store.groups(query, "model", limit=50)
        detail = {**(settings or {}), "customer_identifier": customer, "period_start": iso(query.start), "period_end": iso(query.end),
                  **summary, "total_spend": summary["total_cost"],
                  "spend_by_day": [{"date": iso(g["group"])[:10], "cost": g["total_cost"],  # type: ignore[index]
                                    "requests": g["number_of_requests"], "tokens": g["total_tokens"]} for g in days],
                  "models": [{"model": g["group"], "cost": g["total_cost"], "requests": g["number_of_requests"],
                              "tokens": g["total_tokens"]} for g in models]}
        return json_response(detail)

    # -- the dashboard's figures -----------------------------------------------------------

    async def _percentiles(self, query: LogQuery) -> dict[str, Any]:
        """Latency and TTFT p50/p90/p99: exact over small ranges, else interpolated in buckets."""
        assert self.store is not None
        approximate = await self.store.percentiles(query)
        counts = approximate.pop("counts", None) or {}
        for column in ("latency", "time_to_first_token"):
            count = counts.get(column, 0)
            if 0 < count <= EXACT_PERCENTILES_UP_TO:
                approximate[column] = {name: await _exact_percentile(self.store, query, column, count, q)
                                       for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
        return approximate

    async def stats(self, request: Request) -> Response:
        """Time series and breakdowns for /dashboard over the query's range (default: 24 hours)."""
        query, refused = await self._query(request, default_window=86400.0)
        if refused is not None:
            return refused
        assert query is not None and self.store is not None
        store = self.store
        span = (query.end or time.time()) - (query.start or 0.0)
        size = next((b for b in BUCKETS if span / b <= 120), BUCKETS[-1])
        bucket = sql.bucket_expr(store.dialect, size)
        summary = await store.summary(query)
        percentiles = await self._percentiles(query)
        series = await store.groups(query, bucket, limit=1000, order="grp ASC")
        by_model = await store.groups(query, "model", limit=10)
        by_customer = await store.groups(query, "customer_identifier", limit=10)
        top_models = [g["group"] for g in by_model[:5] if g["group"] is not None]
        model_series: list[dict[str, Any]] = []
        if top_models:
            narrowed = LogQuery(**{**_fields(query), "all_of": [*query.all_of, condition("model", "in", top_models, where="model")]})
            model_series = await store.groups(narrowed, bucket, by="model", limit=5000, order="grp ASC")
        top_customers = [g["group"] for g in by_customer[:5] if g["group"] is not None]
        customer_series: list[dict[str, Any]] = []
        if top_customers:
            narrowed = LogQuery(**{**_fields(query), "all_of": [
                *query.all_of, condition("customer_identifier", "in", top_customers, where="customer_identifier")]})
            customer_series = await store.groups(narrowed, bucket, by="customer_identifier", limit=5000, order="grp ASC")
        total = summary["number_of_requests"]
        return json_response({
            "start_time": iso(query.start), "end_time": iso(query.end), "bucket_seconds": size,
            "summary": {**summary, "error_rate": summary["error_count"] / total if total else 0.0,
                        "cache_hit_rate": summary["cache_hits"] / total if total else 0.0},
            "percentiles": percentiles,
            "series": [_point(g) for g in series],
            "by_model": [_breakdown(g) for g in by_model],
            "by_customer": [_breakdown(g) for g in by_customer],
            "model_series": [{**_point(g), "model": g["by"]} for g in model_series],
            "customer_series": [{**_point(g), "customer_identifier": g["by"]} for g in customer_series],
        })


Handler = Callable[[Request], Awaitable[Response]]


def _store_errors(handler: Handler) -> Handler:
    """A store that cannot answer (database down, file unreadable) is a 503, not a 500."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            logger.warning("log store query failed: %r", exc)
            return error_response(f"The log store is unavailable: {type(exc).__name__}", 503)

    return guarded


EXACT_PERCENTILES_UP_TO = 20_000  # rows; past this, percentiles come from histogram buckets in one pass


async def _exact_percentile(store: LogStore, query: LogQuery, column: str, count: int, q: float) -> float | None:
    """The nearest-rank percentile: the row at rank ceil(q * count) in `column` order."""
    rank = max(math.ceil(q * count), 1)
    narrowed = LogQuery(**{**_fields(query), "all_of": [*query.all_of, condition(column, "isnull", [False], where=column)],
                           "sort_column": column, "descending": False, "page": rank, "page_size": 1})
    _, rows = await store.list(narrowed)
    return rows[0][column] if rows else None


def _spans(body: Any) -> list[tuple[str, Any]]:
    return [(f"[{i}].", span) for i, span in enumerate(spans_of(body))]


def _fields(query: LogQuery) -> dict[str, Any]:
    return {f: getattr(query, f) for f in query.__struct_fields__}


def _point(g: dict[str, Any]) -> dict[str, Any]:
    return {"t": iso(float(g["group"])), "requests": g["number_of_requests"], "errors": g["error_count"],
            "cost": g["total_cost"], "tokens": g["total_tokens"], "prompt_tokens": g["total_prompt_tokens"],
            "completion_tokens": g["total_completion_tokens"], "cache_hits": g["cache_hits"],
            "avg_latency": g["avg_latency"], "avg_ttft": g["avg_ttft"]}


def _breakdown(g: dict[str, Any]) -> dict[str, Any]:
    return {"name": g["group"], "requests": g["number_of_requests"], "errors": g["error_count"],
            "cost": g["total_cost"], "tokens": g["total_tokens"], "avg_latency": g["avg_latency"]}


def _customer(g: dict[str, Any], query: LogQuery) -> dict[str, Any]:
    return {"customer_identifier": g["group"], "number_of_requests": g["number_of_requests"],
            "total_cost": g["total_cost"], "total_spend": g["total_cost"], "total_tokens": g["total_tokens"],
            "total_prompt_tokens": g["total_prompt_tokens"], "total_completion_tokens": g["total_completion_tokens"],
            "error_count": g["error_count"], "avg_latency": g["avg_latency"],
            "first_seen": iso(g["first_seen"]), "last_seen": iso(g["last_seen"]),
            "period_start": iso(query.start), "period_end": iso(query.end)}


def _page(request: Request, query: LogQuery, count: int, results: list[Any]) -> dict[str, Any]:
    def link(page: int) -> str:
        params = dict(request.query_params)
        params["page"] = str(page)
        return f"{request.url.replace(query=urlencode(params))}"

    pages = (count + query.page_size - 1) // query.page_size
    return {"count": count, "next": link(query.page + 1) if query.page < pages else None,
            "previous": link(query.page - 1) if query.page > 1 else None, "results": results}


def _edits(body: Any, where: str) -> dict[str, Any]:
    """A PATCH body's editable fields, checked; metadata values become strings (None removes a key)."""
    if not isinstance(body, dict):
        raise IngestError(f"{where or 'body'}: expected a JSON object")
    changes: dict[str, Any] = {}
    for name, value in body.items():
        expected = EDITABLE.get(name)
        if expected is None:
            raise IngestError(f"{where}{name}: not editable; editable fields: {', '.join(sorted(EDITABLE))}")
        if not isinstance(value, expected):
            raise IngestError(f"{where}{name}: wrong type {type(value).__name__}")
        if name == "metadata":
            value = {str(k): v if isinstance(v, str) or v is None else _text(v) for k, v in value.items()}
        changes[name] = value
    return changes


def _text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _limit_info(info: Any) -> dict[str, Any]:
    """The detail view's limit_info: the limits checked when the request came in (empty when none applied)."""
    if isinstance(info, dict):
        return info
    return {"is_allowed": True, "limits": []}
