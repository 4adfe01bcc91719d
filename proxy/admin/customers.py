"""/api/users/{customer_identifier}/ PATCH and DELETE: a customer's settings (spec 2.7).

Customers exist implicitly from their first request; PATCH stores settings for one (creating the
entry when there is none yet): name, email, metadata, budgets (`period_budget` per
`budget_duration`, `total_budget`), `markup_percentage`, `rate_limit` and `environment`. The
settings live in the admin store (kind "customer"); the limits stage enforces the budgets and
rate limit on every worker, and the users list and detail (proxy/logs/api.py) show them beside
the spend. DELETE forgets the settings (the customer's logs stay).

Budgets set here win over the same fields sent in a request's `customer_params`; fields set
neither here nor there do not apply.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.admin import AdminGuard, error_response, json_response, read_object
from proxy.admin.keys import InvalidField
from proxy.store import Conflict, StoredObject
from proxy.store.snapshot import Snapshot

KIND = "customer"
DURATIONS = ("daily", "weekly", "monthly", "yearly")
NUMBERS = ("period_budget", "total_budget", "markup_percentage")
TEXTS = ("email", "name")
FIELDS = {*NUMBERS, *TEXTS, "metadata", "budget_duration", "period_start", "period_end", "environment", "rate_limit"}
IDENTIFIER_MAX = 254


def check_customer(body: dict[str, Any], existing: dict[str, Any]) -> dict[str, Any]:
    """A PATCH body merged into the stored settings; null clears a field."""
    unknown = set(body) - FIELDS
    if unknown:
        raise InvalidField(f"{sorted(unknown)[0]}: unknown field; expected some of {', '.join(sorted(FIELDS))}")
    data = dict(existing)
    for field, value in body.items():
        if value is None:
            data.pop(field, None)
            continue
        if field in NUMBERS:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidField(f"{field}: expected a number >= 0, or null")
        elif field == "rate_limit":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidField("rate_limit: expected requests per minute (a whole number >= 1), or null")
        elif field in TEXTS:
            if not isinstance(value, str) or len(value) > 254:
                raise InvalidField(f"{field}: expected a string of at most 254 characters, or null")
        elif field == "metadata":
            if not isinstance(value, dict):
                raise InvalidField("metadata: expected an object, or null")
            value = {**(data.get("metadata") or {}), **value}
        elif field == "budget_duration":
            if value not in DURATIONS:
                raise InvalidField(f"budget_duration: expected one of {', '.join(DURATIONS)}, got {value!r}")
        elif field == "environment":
            if value not in ("test", "production"):
                raise InvalidField("environment: expected 'test' or 'production'")
        elif field in ("period_start", "period_end"):
            value = _date(value, field)
        data[field] = value
    if data.get("period_start") and data.get("period_end") and data["period_end"] < data["period_start"]:
        raise InvalidField("period_end: before period_start")
    return data


def _date(value: Any, field: str) -> str:
    try:
        if isinstance(value, str) and len(value) == 10:
            return date.fromisoformat(value).isoformat()
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidField(f"{field}: expected an ISO-8601 date or time, got {value!r}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()


def view(obj: StoredObject) -> dict[str, Any]:
    return {"customer_identifier": obj.id, **obj.data,
            "created_at": datetime.fromtimestamp(obj.created_at, UTC).isoformat(),
            "updated_at": datetime.fromtimestamp(obj.updated_at, UTC).isoformat()}


class CustomersAPI:
    def __init__(self, snapshot: Snapshot, guard: AdminGuard) -> None:
        self.snapshot = snapshot
        self.guard = guard

    def settings_of(self, customer: str) -> dict[str, Any] | None:
        """The stored settings of one customer, for the users list and detail."""
        obj = self.snapshot.of(KIND).get(customer)
        return view(obj) if obj is not None else None

    def routes(self) -> list[Route]:
        # GET of the same path is the spend detail, served by the logs API
        return [Route("/api/users/{customer_identifier}/", self.guard(self.item), methods=["PATCH", "DELETE"])]

    async def item(self, request: Request) -> Response:
        customer = request.path_params["customer_identifier"]
        if not customer.strip() or len(customer) > IDENTIFIER_MAX:
            return error_response(f"customer_identifier: expected 1 to {IDENTIFIER_MAX} characters", 400)
        if request.method == "DELETE":
            deleted = await self.snapshot.delete(KIND, customer)
            return Response(status_code=204) if deleted else error_response(f"Customer {customer!r} has no settings", 404)
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        try:
            check_customer(body, {})  # a bad body is refused before anything is written
            obj = await self.snapshot.update(KIND, customer, lambda data: check_customer(body, data))
            if obj is None:
                try:
                    obj = await self.snapshot.put(KIND, customer, check_customer(body, {}), create=True)
                except Conflict:  # created by another worker in between: merge into that
                    obj = await self.snapshot.update(KIND, customer, lambda data: check_customer(body, data))
        except InvalidField as exc:
            return error_response(str(exc), 400)
        assert obj is not None
        return json_response(view(obj))
