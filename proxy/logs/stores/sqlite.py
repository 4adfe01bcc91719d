"""The SQLite log store: queries on the SQLite sink's database, from worker threads.

Each thread keeps its own connection; WAL mode lets these reads run while the sink writes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy.logs import sql
from proxy.logs.query import LogQuery
from proxy.logs.schema import PURGED, TABLE, decode_row
from proxy.logs.sinks.sqlite import connect

T = TypeVar("T")


class SQLiteLogStore:
    dialect = sql.SQLITE

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        self.path = Path(path)
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # used by this thread only; close() closes it from the event loop's thread once the
            # executor has stopped
            conn = connect(str(self.path), check_same_thread=False)
            self._local.conn = conn
            self._all.append(conn)
        return conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the SQLite log store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        self._all: list[Any] = []
        # Connections open on first use: a database that cannot be opened now (the sink spools
        # meanwhile) fails the queries that need it, not the gateway's start.
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="llmrelay-logstore")

    async def close(self) -> None:
        if self._executor is None:
            return
        self._executor.shutdown(wait=True)
        self._executor = None
        for conn in self._all:
            conn.close()

    def _fetch(self, statement: str, args: list[Any]) -> list[dict[str, Any]]:
        cursor = self._conn().execute(statement, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _one(self, statement: str, args: list[Any]) -> tuple[Any, ...]:
        return self._conn().execute(statement, args).fetchone()

    async def list(self, query: LogQuery) -> tuple[int, list[dict[str, Any]]]:
        page, count, args = sql.list_sql(query, self.dialect)

        def work() -> tuple[int, list[dict[str, Any]]]:
            rows = self._fetch(page, args)
            page_args = args[:-2]
            total = self._one(count, page_args)[0]
            return total, [decode_row(r) for r in rows]

        return await self._run(work)

    async def get(self, unique_id: str) -> dict[str, Any] | None:
        rows = await self._run(self._fetch, f"SELECT * FROM {TABLE} WHERE unique_id = ?1", [unique_id])
        return decode_row(rows[0]) if rows else None

    async def update(self, changes: list[tuple[str, dict[str, Any]]]) -> list[str]:
        def work() -> list[str]:
            conn = self._conn()
            with conn:
                conn.execute("BEGIN IMMEDIATE")  # read-modify-write of metadata: hold the write lock
                missing = []
                current: dict[str, Any] = {}
                for unique_id, _ in changes:
                    row = conn.execute(f"SELECT metadata FROM {TABLE} WHERE unique_id = ?1", [unique_id]).fetchone()
                    if row is None:
                        missing.append(unique_id)
                    else:
                        current[unique_id] = orjson.loads(row[0]) if row[0] else {}
                if missing:
                    conn.rollback()
                    return missing
                for unique_id, fields in changes:
                    values = dict(fields)
                    if "metadata" in values:
                        merged = {**current[unique_id], **values["metadata"]}
                        values["metadata"] = orjson.dumps({k: v for k, v in merged.items() if v is not None}).decode()
                        current[unique_id] = orjson.loads(values["metadata"])
                    if not values:
                        continue
                    assignments = ", ".join(f"{name} = ?{i}" for i, name in enumerate(values, start=2))
                    conn.execute(f"UPDATE {TABLE} SET {assignments} WHERE unique_id = ?1",
                                 [unique_id, *values.values()])
            return []

        return await self._run(work)

    async def summary(self, query: LogQuery) -> dict[str, Any]:
        statement, args = sql.summary_sql(query, self.dialect)
        return sql.summary_of(await self._run(self._one, statement, args))

    async def groups(self, query: LogQuery, group: str, *, by: str | None = None, limit: int = 100,
                     offset: int = 0, order: str = "total_cost DESC") -> list[dict[str, Any]]:
        statement, args = sql.grouped_sql(query, self.dialect, group, by=by, limit=limit, offset=offset, order=order)

        def work() -> list[dict[str, Any]]:
            return [sql.group_of(row) for row in self._conn().execute(statement, args).fetchall()]

        return await self._run(work)

    async def count_groups(self, query: LogQuery, group: str) -> int:
        statement, args = sql.count_groups_sql(query, self.dialect, group)
        return int((await self._run(self._one, statement, args))[0])

    async def percentiles(self, query: LogQuery) -> dict[str, Any]:
        statement, args = sql.percentiles_sql(query, self.dialect)
        return sql.percentiles_of(await self._run(self._one, statement, args))

    async def purge(self, *, content_before: float | None, delete_before: float | None,
                    batch: int = 1000) -> tuple[int, int]:
        cleared = ", ".join(f"{name} = NULL" for name in PURGED)
        kept = "COALESCE(is_pinned, 0) = 0"  # a column added by a migration is NULL in old rows

        def delete_step() -> int:
            # one short transaction per batch, so the sink's writes never wait long
            with self._conn() as conn:
                return conn.execute(f"DELETE FROM {TABLE} WHERE rowid IN (SELECT rowid FROM {TABLE} "
                                    f"WHERE timestamp < ?1 AND {kept} LIMIT ?2)", [delete_before, batch]).rowcount

        def blur_step() -> int:
            with self._conn() as conn:
                return conn.execute(f"UPDATE {TABLE} SET {cleared}, blurred = 1 WHERE rowid IN (SELECT rowid "
                                    f"FROM {TABLE} WHERE timestamp < ?1 AND COALESCE(blurred, 0) = 0 AND {kept} "
                                    f"LIMIT ?2)", [content_before, batch]).rowcount

        # deletes first, so that rows about to go are not blurred on the way
        deleted = await self._repeat(delete_step, batch) if delete_before is not None else 0
        blurred = await self._repeat(blur_step, batch) if content_before is not None else 0
        return blurred, deleted

    async def _repeat(self, step: Callable[[], int], batch: int) -> int:
        total = 0
        while True:
            done = await self._run(step)
            total += done
            if done < batch:
                return total
