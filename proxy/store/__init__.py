"""The admin store: objects created through the admin API (keys, and later providers, models,
customers, prompts), persisted in SQLite by default or PostgreSQL.

Every object is a JSON document under (kind, id). Every write also bumps one change counter in
the same transaction: gateway workers and replicas poll that counter and reload their in-memory
snapshot when it moves (proxy/store/snapshot.py), so the request path never reads the store.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from proxy.settings import StoreSettings


class StoredObject(msgspec.Struct, frozen=True):
    kind: str
    id: str
    data: dict[str, Any]
    created_at: float
    updated_at: float


class StoreUnavailable(Exception):
    """The admin store cannot be reached (an admin write answers 503; reads use the snapshot)."""


class Conflict(Exception):
    """put(create=True) of an id that exists, or put(if_updated_at=...) of an object changed since."""


class AdminStore(Protocol):
    async def open(self) -> None:
        """Create and migrate the schema. Raises when the database cannot be reached."""

    async def close(self) -> None: ...

    async def version(self) -> int:
        """The change counter: moves on every write."""

    async def load(self) -> tuple[int, list[StoredObject]]:
        """(version, every object), read in one transaction."""

    async def get(self, kind: str, id: str) -> StoredObject | None:
        """One object as stored now (the admin API's read-modify-write reads here, not the snapshot)."""

    async def put(self, kind: str, id: str, data: dict[str, Any], *, create: bool = False,
                  if_updated_at: float | None = None) -> StoredObject:
        """Insert or replace. With create=True an existing id raises Conflict; with `if_updated_at`
        an object that is gone or was written since (another updated_at) raises Conflict."""

    async def delete(self, kind: str, id: str) -> bool:
        """False when there was no such object."""


def make_admin_store(settings: StoreSettings) -> AdminStore:
    if settings.backend == "postgres":
        from proxy.store.postgres import PostgresAdminStore

        return PostgresAdminStore(settings.dsn or "")
    from proxy.store.sqlite import SQLiteAdminStore

    return SQLiteAdminStore(settings.path)
