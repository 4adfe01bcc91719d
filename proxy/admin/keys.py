"""/api/temporary-keys/: gateway keys created, changed and revoked while the gateway runs (spec 2.7).

The secret is returned once, on create; only its SHA-256 is stored. Keys live in the admin store
(kind "key") and reach every worker through the snapshot; the auth stage serves them beside the
config file's keys, and a revoked key is refused as soon as the snapshot has the change.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.admin import AdminGuard, error_response, json_response, read_object
from proxy.keys import hash_key, new_key
from proxy.settings import ApiKey
from proxy.store import StoredObject
from proxy.store.snapshot import Snapshot

KIND = "key"
NOT_FOUND = "Not found."
FIELDS = {"name", "expiry_date", "max_usage", "rate_limit", "spending_limit", "is_test", "environment"}


class InvalidField(ValueError):
    """A bad field; the message names it."""


def stored_keys(objects: dict[str, StoredObject]) -> list[ApiKey]:
    """The snapshot's keys as ApiKeys, for the auth stage (an unreadable one is skipped)."""
    keys = []
    for obj in objects.values():
        data = obj.data
        expires = data.get("expires_at")
        keys.append(ApiKey(name=data["name"], key_hash=data["key_hash"], environment=data.get("environment", "production"),
                           expires_at=datetime.fromisoformat(expires) if expires else None,
                           rate_limit=data.get("rate_limit"), spending_limit=data.get("spending_limit"),
                           max_usage=data.get("max_usage")))
    return keys


def _check(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """The fields of a create or PATCH body, in stored form."""
    unknown = set(body) - FIELDS
    if unknown:
        raise InvalidField(f"{sorted(unknown)[0]}: unknown field; expected some of {', '.join(sorted(FIELDS))}")
    out: dict[str, Any] = {}
    if "name" in body or creating:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise InvalidField("name: required, a string of 1 to 200 characters")
        out["name"] = name.strip()
    if "expiry_date" in body:
        value = body["expiry_date"]
        if value is None:
            out["expires_at"] = None
        else:
            try:
                parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                raise InvalidField(f"expiry_date: expected an ISO-8601 time, got {value!r}") from None
            out["expires_at"] = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()
    if "max_usage" in body:
        value = body["max_usage"]
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise InvalidField("max_usage: expected a whole number of requests, or -1 for unlimited")
        out["max_usage"] = None if value == -1 else value
    if "rate_limit" in body:
        value = body["rate_limit"]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidField("rate_limit: expected requests per minute (a whole number of at least 1) or null")
        out["rate_limit"] = value
    if "spending_limit" in body:
        value = body["spending_limit"]
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value < 0):
            raise InvalidField("spending_limit: expected USD (a number of at least 0) or null")
        out["spending_limit"] = value
    if "is_test" in body or "environment" in body:
        environment = body.get("environment")
        if "is_test" in body:
            if not isinstance(body["is_test"], bool):
                raise InvalidField("is_test: expected true or false")
            environment = "test" if body["is_test"] else "production"
        if environment not in ("test", "production"):
            raise InvalidField("environment: expected 'test' or 'production'")
        out["environment"] = environment
    return out


def _view(obj: StoredObject) -> dict[str, Any]:
    """A key as the API shows it: never the secret, never its hash."""
    data = obj.data
    return {"id": obj.id, "name": data["name"], "prefix": data.get("prefix"), "environment": data.get("environment"),
            "is_test": data.get("environment") == "test", "expiry_date": data.get("expires_at"),
            "max_usage": -1 if data.get("max_usage") is None else data["max_usage"],
            "rate_limit": data.get("rate_limit"), "spending_limit": data.get("spending_limit"),
            "created_at": datetime.fromtimestamp(obj.created_at, UTC).isoformat(),
            "updated_at": datetime.fromtimestamp(obj.updated_at, UTC).isoformat()}


class KeysAPI:
    def __init__(self, snapshot: Snapshot, guard: AdminGuard, config_key_names: set[str]) -> None:
        self.snapshot = snapshot
        self.guard = guard
        self.config_key_names = config_key_names  # names the config file already uses

    def routes(self) -> list[Route]:
        guard = self.guard
        return [
            Route("/api/temporary-keys/", guard(self.collection), methods=["GET", "POST"]),
            Route("/api/temporary-keys/{id}/", guard(self.item), methods=["GET", "PATCH", "DELETE"]),
        ]

    def _name_taken(self, name: str, except_id: str | None = None) -> bool:
        if name in self.config_key_names:
            return True
        return any(o.data.get("name") == name and o.id != except_id for o in self.snapshot.of(KIND).values())

    async def _fields(self, request: Request, key_id: str | None) -> dict[str, Any] | Response:
        """A create (key_id None) or PATCH body's fields, checked, or the 400 to answer."""
        body, refused = await read_object(request)
        if refused is not None:
            return refused
        try:
            fields = _check(body, creating=key_id is None)
        except InvalidField as exc:
            return error_response(str(exc), 400)
        if "name" in fields and self._name_taken(fields["name"], except_id=key_id):
            return error_response(f"name: a key named {fields['name']!r} exists; key names are unique", 400)
        return fields

    async def collection(self, request: Request) -> Response:
        if request.method == "GET":
            keys = sorted(self.snapshot.of(KIND).values(), key=lambda o: o.created_at, reverse=True)
            return json_response({"count": len(keys), "results": [_view(o) for o in keys]})
        fields = await self._fields(request, None)
        if isinstance(fields, Response):
            return fields
        secret = new_key()
        data = {"environment": "production", "expires_at": None, "max_usage": None, "rate_limit": None,
                "spending_limit": None, **fields, "key_hash": hash_key(secret), "prefix": secret[:16] + "..."}
        obj = await self.snapshot.put(KIND, uuid.uuid4().hex, data, create=True)
        return json_response({**_view(obj), "api_key": secret}, 201)

    async def item(self, request: Request) -> Response:
        key_id = request.path_params["id"]
        obj = self.snapshot.of(KIND).get(key_id)
        if obj is None:
            await self.snapshot.refresh()  # made by another worker a moment ago?
            obj = self.snapshot.of(KIND).get(key_id)
        if obj is None:
            return error_response(NOT_FOUND, 404)
        if request.method == "GET":
            return json_response(_view(obj))
        if request.method == "DELETE":
            await self.snapshot.delete(KIND, key_id)
            return Response(status_code=204)
        fields = await self._fields(request, key_id)
        if isinstance(fields, Response):
            return fields
        updated = await self.snapshot.put(KIND, key_id, {**obj.data, **fields})
        return json_response(_view(updated))
