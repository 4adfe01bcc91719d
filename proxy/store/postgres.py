"""The admin store in PostgreSQL (asyncpg), for replicas that share one database."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import orjson

from proxy.store import Conflict, StoredObject, StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS admin_objects (kind text NOT NULL, id text NOT NULL, data jsonb NOT NULL,
    created_at double precision NOT NULL, updated_at double precision NOT NULL, PRIMARY KEY (kind, id));
CREATE TABLE IF NOT EXISTS admin_version (one integer PRIMARY KEY CHECK (one = 1), value bigint NOT NULL);
INSERT INTO admin_version (one, value) VALUES (1, 0) ON CONFLICT DO NOTHING;
"""
BUMP = "UPDATE admin_version SET value = value + 1 WHERE one = 1"
MIGRATION_LOCK = 0x6C6C6D72  # pg_advisory_xact_lock key: workers starting together migrate one at a time


class PostgresAdminStore:
    def __init__(self, dsn: str, pool_size: int = 2) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute(SCHEMA)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the admin store (PostgreSQL) is not connected")
        return self._pool

    async def version(self) -> int:
        return int(await self._db().fetchval("SELECT value FROM admin_version"))

    async def load(self) -> tuple[int, list[StoredObject]]:
        async with self._db().acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            version = await conn.fetchval("SELECT value FROM admin_version")
            rows = await conn.fetch("SELECT kind, id, data::text AS data, created_at, updated_at FROM admin_objects")
        return int(version), [StoredObject(r["kind"], r["id"], orjson.loads(r["data"]), r["created_at"],
                                           r["updated_at"]) for r in rows]

    async def get(self, kind: str, id: str) -> StoredObject | None:
        row = await self._db().fetchrow("SELECT data::text AS data, created_at, updated_at FROM admin_objects "
                                        "WHERE kind = $1 AND id = $2", kind, id)
        return StoredObject(kind, id, orjson.loads(row["data"]), row["created_at"], row["updated_at"]) if row else None

    async def put(self, kind: str, id: str, data: dict[str, Any], *, create: bool = False,
                  if_updated_at: float | None = None) -> StoredObject:
        now = time.time()
        async with self._db().acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT created_at, updated_at FROM admin_objects WHERE kind = $1 AND id = $2 "
                                      "FOR UPDATE", kind, id)
            if row is not None and create:
                raise Conflict(f"{kind} {id!r} exists")
            if if_updated_at is not None and (row is None or row["updated_at"] != if_updated_at):
                raise Conflict(f"{kind} {id!r} changed since it was read")
            created = row["created_at"] if row is not None else now
            if row is not None:
                now = max(now, row["updated_at"] + 1e-6)  # a write always moves updated_at
            try:
                await conn.execute(
                    "INSERT INTO admin_objects (kind, id, data, created_at, updated_at) VALUES ($1, $2, $3::jsonb, $4, $5) "
                    "ON CONFLICT (kind, id) DO UPDATE SET data = EXCLUDED.data, updated_at = EXCLUDED.updated_at",
                    kind, id, orjson.dumps(data).decode(), created, now)
            except asyncpg.UniqueViolationError:  # created by another replica since the SELECT
                raise Conflict(f"{kind} {id!r} exists") from None
            await conn.execute(BUMP)
        return StoredObject(kind, id, data, created, now)

    async def delete(self, kind: str, id: str) -> bool:
        async with self._db().acquire() as conn, conn.transaction():
            deleted = await conn.execute("DELETE FROM admin_objects WHERE kind = $1 AND id = $2", kind, id)
            if deleted.endswith(" 0"):
                return False
            await conn.execute(BUMP)
        return True
