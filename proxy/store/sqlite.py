"""The admin store in SQLite (the embedded default), on one worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy.store import Conflict, StoredObject

T = TypeVar("T")
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS admin_objects (kind TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL, "
    "created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (kind, id))",
    "CREATE TABLE IF NOT EXISTS admin_version (one INTEGER PRIMARY KEY CHECK (one = 1), value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO admin_version (one, value) VALUES (1, 0)",
)
BUMP = "UPDATE admin_version SET value = value + 1 WHERE one = 1"


class SQLiteAdminStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the admin store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llmrelay-admin-store")
        await self._run(self._connect)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=10.0)  # several workers share the file
        conn.execute("PRAGMA journal_mode=WAL")
        with conn:
            for statement in SCHEMA:
                conn.execute(statement)
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._disconnect)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def version(self) -> int:
        return await self._run(lambda: self._db().execute("SELECT value FROM admin_version").fetchone()[0])

    async def load(self) -> tuple[int, list[StoredObject]]:
        def work() -> tuple[int, list[StoredObject]]:
            conn = self._db()
            with conn:  # one read transaction: the version and the objects agree
                conn.execute("BEGIN")
                version = conn.execute("SELECT value FROM admin_version").fetchone()[0]
                rows = conn.execute("SELECT kind, id, data, created_at, updated_at FROM admin_objects").fetchall()
            return version, [StoredObject(k, i, orjson.loads(d), c, u) for k, i, d, c, u in rows]

        return await self._run(work)

    async def get(self, kind: str, id: str) -> StoredObject | None:
        def work() -> StoredObject | None:
            row = self._db().execute("SELECT data, created_at, updated_at FROM admin_objects WHERE kind = ? AND id = ?",
                                     (kind, id)).fetchone()
            return StoredObject(kind, id, orjson.loads(row[0]), row[1], row[2]) if row is not None else None

        return await self._run(work)

    async def put(self, kind: str, id: str, data: dict[str, Any], *, create: bool = False,
                  if_updated_at: float | None = None) -> StoredObject:
        def work() -> StoredObject:
            conn = self._db()
            now = time.time()
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute("SELECT created_at, updated_at FROM admin_objects WHERE kind = ? AND id = ?",
                                   (kind, id)).fetchone()
                if row is not None and create:
                    raise Conflict(f"{kind} {id!r} exists")
                if if_updated_at is not None and (row is None or row[1] != if_updated_at):
                    raise Conflict(f"{kind} {id!r} changed since it was read")
                now = max(now, row[1] + 1e-6) if row is not None else now  # a write always moves updated_at
                created = row[0] if row is not None else now
                conn.execute("INSERT OR REPLACE INTO admin_objects (kind, id, data, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?)", (kind, id, orjson.dumps(data).decode(), created, now))
                conn.execute(BUMP)
            return StoredObject(kind, id, data, created, now)

        return await self._run(work)

    async def delete(self, kind: str, id: str) -> bool:
        def work() -> bool:
            conn = self._db()
            with conn:
                deleted = conn.execute("DELETE FROM admin_objects WHERE kind = ? AND id = ?", (kind, id)).rowcount
                if deleted:
                    conn.execute(BUMP)
            return bool(deleted)

        return await self._run(work)
