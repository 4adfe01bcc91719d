"""The PostgreSQL log store: queries on the postgres sink's table, through a small asyncpg pool.

The pool connects on demand: a database that is down when the gateway starts (the sink spools
meanwhile) fails the queries that need it, which the API answers with a 503, not the start.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson

from proxy.logs import sql
from proxy.logs.query import LogQuery
from proxy.logs.schema import PURGED, TABLE, decode_row
from proxy.logs.sinks.postgres import close_pool, create_pool, quoted, strip_nul, strip_nul_json

CONNECT_TIMEOUT = 5.0  # an unreachable database answers the API with a 503 in this many seconds
COMMAND_TIMEOUT = 30.0
# JIT compiling a log aggregate over a million rows took 50-140 ms of its plan (EXPLAIN ANALYZE in
# benchmarks/logs_query.py) and won back about as much at best; smaller windows only pay for it.
SESSION = {"jit": "off"}


def _affected(status: str) -> int:
    """Rows a DELETE / UPDATE touched, from its status tag ("DELETE 42")."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresLogStore:
    dialect = sql.POSTGRES

    def __init__(self, dsn: str, pool_size: int = 4) -> None:
        self._dsn = dsn  # may hold a password: never put it in a message
        self._pool_size = max(1, pool_size)
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"PostgresLogStore(pool_size={self._pool_size})"

    async def open(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(self._dsn, self._pool_size, connect_timeout=CONNECT_TIMEOUT,
                                           command_timeout=COMMAND_TIMEOUT, server_settings=SESSION)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    def _connection(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the PostgreSQL log store is not open")
        return self._pool.acquire()

    async def _fetch(self, statement: str, args: list[Any]) -> list[dict[str, Any]]:
        async with self._connection() as conn:
            return [dict(row) for row in await conn.fetch(statement, *args)]

    async def _one(self, statement: str, args: list[Any]) -> tuple[Any, ...]:
        async with self._connection() as conn:
            return tuple(await conn.fetchrow(statement, *args))

    async def list(self, query: LogQuery) -> tuple[int, list[dict[str, Any]]]:
        page, count, args = sql.list_sql(query, self.dialect)
        # two connections: the count over the whole match and the page at the same time
        rows, total = await asyncio.gather(self._fetch(page, args), self._one(count, args[:-2]))
        return int(total[0]), [decode_row(r) for r in rows]

    async def get(self, unique_id: str) -> dict[str, Any] | None:
        rows = await self._fetch(f"SELECT * FROM {TABLE} WHERE unique_id = $1", [unique_id])
        return decode_row(rows[0]) if rows else None

    async def update(self, changes: list[tuple[str, dict[str, Any]]]) -> list[str]:
        ids = sorted({unique_id for unique_id, _ in changes})
        async with self._connection() as conn, conn.transaction():
            # FOR UPDATE: the read-modify-write of metadata is atomic; ordered, so two batch
            # updates over the same rows lock them in the same order and cannot deadlock.
            rows = await conn.fetch(f"SELECT unique_id, metadata FROM {TABLE} WHERE unique_id = ANY($1::text[]) "
                                    f"ORDER BY unique_id FOR UPDATE", ids)
            current: dict[str, Any] = {r["unique_id"]: orjson.loads(r["metadata"]) if r["metadata"] else {}
                                       for r in rows}
            missing = [unique_id for unique_id, _ in changes if unique_id not in current]
            if missing:
                return missing  # the transaction ends without a write
            for unique_id, fields in changes:
                values = dict(fields)
                if "metadata" in values:
                    merged = {**current[unique_id], **values["metadata"]}
                    current[unique_id] = {k: v for k, v in merged.items() if v is not None}
                    values["metadata"] = strip_nul_json(orjson.dumps(current[unique_id]).decode())
                if isinstance(values.get("note"), str):
                    values["note"] = strip_nul(values["note"])
                if not values:
                    continue
                assignments = ", ".join(f"{quoted(name)} = ${i}" for i, name in enumerate(values, start=2))
                await conn.execute(f"UPDATE {TABLE} SET {assignments} WHERE unique_id = $1",
                                   unique_id, *values.values())
        return []

    async def summary(self, query: LogQuery) -> dict[str, Any]:
        statement, args = sql.summary_sql(query, self.dialect)
        return sql.summary_of(await self._one(statement, args))

    async def groups(self, query: LogQuery, group: str, *, by: str | None = None, limit: int = 100,
                     offset: int = 0, order: str = "total_cost DESC") -> list[dict[str, Any]]:
        statement, args = sql.grouped_sql(query, self.dialect, group, by=by, limit=limit, offset=offset, order=order)
        async with self._connection() as conn:
            return [sql.group_of(tuple(row)) for row in await conn.fetch(statement, *args)]

    async def count_groups(self, query: LogQuery, group: str) -> int:
        statement, args = sql.count_groups_sql(query, self.dialect, group)
        return int((await self._one(statement, args))[0])

    async def percentiles(self, query: LogQuery) -> dict[str, Any]:
        statement, args = sql.percentiles_sql(query, self.dialect)
        return sql.percentiles_of(await self._one(statement, args))

    async def purge(self, *, content_before: float | None, delete_before: float | None,
                    batch: int = 1000) -> tuple[int, int]:
        cleared = ", ".join(f"{quoted(name)} = NULL" for name in PURGED)
        # One statement (one short transaction) per batch, so the sink's inserts never wait long.
        # SKIP LOCKED: gateway workers running retention at once take different rows.
        delete = (f"DELETE FROM {TABLE} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {TABLE} WHERE timestamp < $1 "
                  f"AND NOT is_pinned LIMIT $2 FOR UPDATE SKIP LOCKED))")
        blur = (f"UPDATE {TABLE} SET {cleared}, blurred = true WHERE ctid = ANY(ARRAY(SELECT ctid FROM {TABLE} "
                f"WHERE timestamp < $1 AND NOT blurred AND NOT is_pinned LIMIT $2 FOR UPDATE SKIP LOCKED))")
        # Deletes first: rows about to go are not blurred on the way.
        deleted = blurred = 0
        if delete_before is not None:
            deleted = await self._in_batches(delete, float(delete_before), batch)
        if content_before is not None:
            blurred = await self._in_batches(blur, float(content_before), batch)
        return blurred, deleted

    async def _in_batches(self, statement: str, before: float, batch: int) -> int:
        total = 0
        while True:
            async with self._connection() as conn:
                done = _affected(await conn.execute(statement, before, batch))
            total += done
            if done < batch:
                return total
