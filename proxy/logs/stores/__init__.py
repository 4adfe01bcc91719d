"""Log stores: the query side of the sinks that can answer queries (SQLite, PostgreSQL).

The list, detail, update, summary, users and dashboard APIs read through a LogStore; records are
written by the sinks (through the LogQueue), never by the store, except for the edits the API
allows (PATCH) and retention.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.logs.query import LogQuery
from proxy.logs.sql import Dialect
from proxy.settings import LogSink

# Fields a PATCH may change (spec 2.4), with their types; metadata is merged, not replaced.
EDITABLE = {"is_pinned": bool, "positive_feedback": (bool, type(None)), "note": (str, type(None)),
            "metadata": dict}


class LogStore(Protocol):
    dialect: Dialect  # for the SQL expressions callers pass to `groups` (sql.bucket_expr)

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def list(self, query: LogQuery) -> tuple[int, list[dict[str, Any]]]:
        """(count of all matches, the page's rows decoded by schema.decode_row)."""

    async def get(self, unique_id: str) -> dict[str, Any] | None: ...

    async def update(self, changes: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Apply (unique_id, {field: value}) edits in one transaction; `metadata` merges into the
        stored metadata (a None value removes the key). Returns the ids not found; when any is
        missing nothing is applied."""

    async def summary(self, query: LogQuery) -> dict[str, Any]: ...

    async def groups(self, query: LogQuery, group: str, *, by: str | None = None, limit: int = 100,
                     offset: int = 0, order: str = "total_cost DESC") -> list[dict[str, Any]]:
        """sql.group_of dicts per `group` value (see sql.grouped_sql)."""

    async def count_groups(self, query: LogQuery, group: str) -> int: ...

    async def percentiles(self, query: LogQuery) -> dict[str, Any]: ...

    async def purge(self, *, content_before: float | None, delete_before: float | None,
                    batch: int = 1000) -> tuple[int, int]:
        """Retention: blur rows older than content_before (content fields cleared, blurred set),
        delete rows older than delete_before; pinned rows are kept whole. (blurred, deleted)."""



def make_store(sinks: list[LogSink]) -> LogStore | None:
    """The store the APIs query: the postgres sink's database if there is one, else the sqlite sink's."""
    by_type = {s.type: s for s in sinks}
    if "postgres" in by_type:
        from proxy.logs.stores.postgres import PostgresLogStore

        postgres = by_type["postgres"]
        return PostgresLogStore(postgres.dsn or "", pool_size=postgres.pool_size)
    if "sqlite" in by_type:
        from proxy.logs.stores.sqlite import SQLiteLogStore

        return SQLiteLogStore(by_type["sqlite"].path or "")
    return None
